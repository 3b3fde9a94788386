"""The main job end to end, through the same code as `dicom-node quickstart`: a study acquired
into Orthanc is routed to the node, the prior is fetched from Orthanc, compared, and the SR
comes back into Orthanc. Assertions are on the SR fetched back from the PACS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.local_stack.scenario import acquire, report_findings, seed_pacs, wait_for_report, write_history
from dicom_node.local_stack.stack import LocalStack, Ports
from dicom_node.report.codes import CHANGE_CODES
from tests.support.validation import assert_valid_dicom
from tests.support.waiting import wait_until


def all_text_values(ds) -> list[str]:
    values = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            values.append(item.TextValue)
        values.extend(all_text_values(item))
    return values


def evidence_studies(sr, keyword: str) -> set[str]:
    return {item.StudyInstanceUID for item in sr.get(keyword, [])}


@pytest.mark.parametrize("change", ["new_nodule", "stable"])
def test_study_routed_compared_and_reported_back_to_the_pacs(stack, tmp_path, change):
    scenario = write_history(tmp_path / "data", change, size=512)
    seed_pacs(stack.orthanc, scenario)
    acquire(stack.orthanc, scenario)
    sr = wait_for_report(stack.orthanc, scenario.current_study_uid, timeout=150)

    # In the right study, referencing the current study and the prior the rules should pick
    # (the 2025 PA, not the newer lateral, the older PA or the namesake).
    assert sr.StudyInstanceUID == scenario.current_study_uid
    assert evidence_studies(sr, "CurrentRequestedProcedureEvidenceSequence") == {scenario.current_study_uid}
    assert evidence_studies(sr, "PertinentOtherEvidenceSequence") == {scenario.expected_prior_uid}

    findings = report_findings(sr)
    changes = [f.get("Description of Change") for f in findings]
    if change == "stable":
        assert all(c in (None, CHANGE_CODES["stable"].meaning) for c in changes), findings
    else:
        expected = CHANGE_CODES[scenario.expected_status].meaning
        matching = [f for f in findings if f.get("Description of Change") == expected]
        assert matching, f"no {scenario.expected_status!r} finding in {findings}"
        side, level, _ = scenario.expected_zone.split(" ")  # e.g. "left middle zone"
        assert any(level.capitalize() in f.get("Finding Site", "") and f.get("Laterality", "").lower() == side for f in matching), findings

    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid_dicom(path)
    # The choice is explainable from the command line, with the node's own settings.
    explained = subprocess.run([sys.executable, "-m", "dicom_node", "priors", scenario.current_study_uid],
                               env=stack.node_env(), capture_output=True, text=True, timeout=60)
    assert explained.returncode == 0, explained.stderr
    assert scenario.expected_prior_uid in explained.stdout and "LAT" in explained.stdout
    # Exactly one report in the PACS for this study.
    reports = [i for i in stack.orthanc.instances_of_study(scenario.current_study_uid) if i["MainDicomTags"].get("SOPInstanceUID") == sr.SOPInstanceUID]
    assert len(reports) == 1
    assert_phi_accesses_audited(stack, scenario, sr)


def audit_rows(stack, study_uid: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "dicom_node", "audit", "--json", "--study", study_uid],
                         env=stack.node_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_phi_accesses_audited(stack, scenario, sr) -> None:
    """Every read and disclosure of the patient's data on the way has its audit row, with who and to whom."""
    def current_rows_once_reported() -> list[dict] | None:
        rows = audit_rows(stack, scenario.current_study_uid)
        return rows if any(r["action"] == "report_sent" for r in rows) else None

    current = wait_until(current_rows_once_reported, timeout=30, interval=0.5, what="the accepted report audited")
    prior = audit_rows(stack, scenario.expected_prior_uid)
    by_action = lambda rows: {r["action"]: r for r in rows}  # noqa: E731
    cur, pri = by_action(current), by_action(prior)
    assert cur["archive_query"]["peer"] == "orthanc" and "dicom-node worker" in cur["archive_query"]["actor"]
    assert pri["archive_retrieve"]["peer"] == "orthanc"
    assert "image_read" in cur and "image_read" in pri
    assert cur["report_sent"]["peer"] == "orthanc" and sr.SOPInstanceUID in cur["report_sent"]["detail"]
    assert "dicom-node priors" in cur["operator_view"]["actor"]  # the explanation above was audited too
    # Patients appear only as the node's keyed pseudonym (its generated key, id "local"): the rows link
    # to the index by study UID.
    out = subprocess.run([sys.executable, "-m", "dicom_node", "pseudonym", "--json", str(sr.PatientID)],
                         env=stack.node_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pseudonym = json.loads(out.stdout)["local"]
    assert {r["patient"] for r in current + prior} == {pseudonym}
    assert str(sr.PatientID) not in json.dumps(current + prior)


def test_quickstart_command_prints_the_result(tmp_path):
    """The README's first command, minus the package installation: the same run a new user sees."""
    workdir = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "quickstart", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        out = result.stdout
        assert "Structured Report in the PACS" in out
        assert "chose 20251118" in out and "view differs" in out
        assert "Stop everything" in out
    finally:
        stopped = subprocess.run([sys.executable, "-m", "dicom_node", "quickstart", "--stop", "--workdir", str(workdir)],
                                 capture_output=True, text=True, timeout=60)
    assert "node" in stopped.stdout and "orthanc" in stopped.stdout


def test_with_a_vlm_configured_the_model_reads_the_pair(tmp_path):
    """A model folder configured: the gpu worker loads it (tiny random Gemma 3 here) and its
    reading goes into the SR; a random model writes garbage, so the SR must say the model
    output was unusable and keep the measured findings."""
    from inference.vlm.tiny import write_tiny_model

    models = tmp_path / "models"
    write_tiny_model(models, "gemma3", name="tiny-gemma")
    stack = LocalStack(tmp_path / "stack", Ports.free(),
                       extra_env={"DICOM_NODE_VLM_MODEL": "tiny-gemma", "DICOM_NODE_MODELS_ROOT": str(models)})
    try:
        stack.start()
        scenario = write_history(tmp_path / "data", "new_nodule", size=512)
        seed_pacs(stack.orthanc, scenario)
        acquire(stack.orthanc, scenario)
        sr = wait_for_report(stack.orthanc, scenario.current_study_uid, timeout=180)
    finally:
        stack.stop()
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    dump = assert_valid_dicom(path)
    assert "tiny-gemma" in dump  # the algorithm identification names the model
    texts = " ".join(all_text_values(sr))
    assert "vlm_output_unusable" in texts
    assert any(f.get("Description of Change") == CHANGE_CODES["new"].meaning for f in report_findings(sr))
