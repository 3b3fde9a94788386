"""A synthetic patient history in the PACS and a new acquisition routed to the node.

Used by `dicom-node quickstart` and by the end-to-end test (same code, so the test checks
what a new user sees).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ..identity import RESULT_SERIES_DESCRIPTION
from ..scu import Peer, send
from .orthanc import Orthanc
from .stack import MODALITY_AE

ARCHIVE_LOADER_AE = "ARCHIVE_LOADER"  # sends the history: Orthanc does not route it to the node
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@dataclass
class Scenario:
    """What was put in the PACS, and the ground truth the node's report should match."""

    change: str
    current_study_uid: str
    expected_prior_uid: str
    expected_status: str
    expected_zone: str
    files: dict[str, list[Path]] = field(default_factory=dict)  # label -> files


def _basic_text_report(image: Dataset, text: str) -> Dataset:
    """A radiologist's prior report as a Basic Text SR in the same study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[image.StudyInstanceUID, "report"])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        if keyword in image:
            setattr(ds, keyword, image.data_element(keyword).value)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[image.StudyInstanceUID, "report series"])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 99, 1
    ds.Manufacturer = "Radiology reporting system"
    ds.SeriesDescription = "Radiology report"
    ds.ContentDate, ds.ContentTime = image.StudyDate, "170000"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", text
    item.ConceptNameCodeSequence = Sequence([_code("121073", "DCM", "Impression")])
    ds.ContentSequence = Sequence([item])
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def write_history(folder: Path, change: str = "new_nodule", seed: int = 7, size: int = 512) -> Scenario:
    """Files for one patient: the new study, the prior the node should pick (with a report),
    and priors it should not pick (older, lateral view, CT, another patient of the same name)."""
    from inference.phantoms import EXPECTED_STATUS, PatientInfo, make_chest_pair

    folder.mkdir(parents=True, exist_ok=True)
    patient = PatientInfo(patient_id="QS-0001", patient_name="Quickstart^Pat", current_date=date(2026, 11, 20),
                          prior_date=date(2025, 11, 18), current_accession="QS2026", prior_accession="QS2025")
    pair = make_chest_pair(seed, change, size=size, patient=patient)
    older = make_chest_pair(seed, "stable", size=size, patient=PatientInfo(
        patient_id="QS-0001", patient_name="Quickstart^Pat", current_date=date(2023, 5, 2),
        prior_date=date(2022, 5, 2), current_accession="QS2023", prior_accession="QS2022"))
    lateral = make_chest_pair(seed, "stable", size=size, view="LAT", patient=PatientInfo(
        patient_id="QS-0001", patient_name="Quickstart^Pat", current_date=date(2026, 3, 9),
        prior_date=date(2025, 3, 9), current_accession="QS2026L", prior_accession="QS2025L"))
    namesake = make_chest_pair(seed + 1, "stable", size=size, patient=PatientInfo(
        patient_id="QS-0999", patient_name="Quickstart^Pat", current_date=date(2026, 6, 1),
        prior_date=date(2025, 6, 1), current_accession="QS9926", prior_accession="QS9925"))
    report = _basic_text_report(pair.prior, "Chest PA: lungs clear, no nodule or effusion. Heart size normal.")

    def save(label: str, *datasets: Dataset) -> None:
        paths = []
        for number, ds in enumerate(datasets):
            path = folder / f"{label}-{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        scenario.files[label] = paths

    truth = pair.truth.regions[0] if pair.truth.regions else None
    scenario = Scenario(
        change=change,
        current_study_uid=pair.current.StudyInstanceUID,
        expected_prior_uid=pair.prior.StudyInstanceUID,
        expected_status=EXPECTED_STATUS[change],
        expected_zone=truth.zone if truth else "",
    )
    save("prior-2025-PA", pair.prior, report)
    save("prior-2023-PA", older.current)
    save("prior-2026-LAT", lateral.current)
    save("other-patient-same-name", namesake.current)
    save("current", pair.current)
    return scenario


def seed_pacs(orthanc: Orthanc, scenario: Scenario) -> None:
    history = [path for label, paths in scenario.files.items() if label != "current" for path in paths]
    report = send(Peer("127.0.0.1", orthanc.dicom_port, orthanc.aet), history, ARCHIVE_LOADER_AE)
    if report.failed:
        raise RuntimeError(f"seeding the PACS failed: {report.failed}\nOrthanc's log ends:\n{orthanc.log_tail()}")


def acquire(orthanc: Orthanc, scenario: Scenario) -> None:
    """The modality sends the new study to the PACS, whose routing rule forwards it to the node."""
    report = send(Peer("127.0.0.1", orthanc.dicom_port, orthanc.aet), scenario.files["current"], MODALITY_AE)
    if report.failed:
        raise RuntimeError(f"acquisition failed: {report.failed}\nOrthanc's log ends:\n{orthanc.log_tail()}")


def wait_for_report(orthanc: Orthanc, study_uid: str, timeout: float = 180.0) -> Dataset:
    """The node's SR, fetched back from the PACS once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for instance in orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}, "Expand": True}) or []:
            tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
            if tags.get("SeriesDescription") == RESULT_SERIES_DESCRIPTION:
                from io import BytesIO

                return dcmread(BytesIO(orthanc.instance_file(instance["ID"])))
        time.sleep(1.0)
    raise TimeoutError(f"no report from the node in the PACS for study {study_uid} after {timeout:.0f}s")


def report_findings(sr: Dataset) -> list[dict]:
    """Per measurement group: finding site, change evaluation and text, read back from the SR."""
    findings = []

    def walk(items, group: dict | None) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "CONTAINER" and name == "Measurement Group":
                group = {"texts": []}
                findings.append(group)
                walk(item.get("ContentSequence", []), group)
                continue
            if group is not None and not name.startswith("Algorithm"):  # repeated per measurement
                if item.ValueType == "CODE":
                    group[name] = item.ConceptCodeSequence[0].CodeMeaning
                elif item.ValueType == "TEXT":
                    group["texts"].append(f"{name}: {item.TextValue}")
                elif item.ValueType == "NUM":
                    group[name] = f"{item.MeasuredValueSequence[0].NumericValue} {item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue}"
            if "ContentSequence" in item and not (item.ValueType == "CONTAINER" and name == "Measurement Group"):
                walk(item.ContentSequence, group)

    walk(sr.get("ContentSequence", []), None)
    return findings


def describe(scenario: Scenario, sr: Dataset, job: dict | None, priors: dict | None) -> str:
    """What the quickstart prints: the chosen prior and why, the findings, the SR's identity."""
    lines = [f"Structured Report in the PACS for study {scenario.current_study_uid}:",
             f"  SOP Instance UID   {sr.SOPInstanceUID}", f"  Series Instance UID {sr.SeriesInstanceUID}"]
    if priors:
        lines.append("Prior selection:")
        for candidate in priors.get("candidates", []):
            mark = "chose " if candidate.get("kept") else "skip  "
            lines.append(f"  {mark}{candidate.get('study_date', '')} {candidate.get('modality', '')} {candidate.get('description', '')}: {candidate.get('rule', '')}")
    lines.append("Findings:")
    for finding in report_findings(sr) or [{"texts": ["none reported"]}]:
        keys = {k: v for k, v in finding.items() if k != "texts"}
        lines.append("  - " + ", ".join(f"{k}: {v}" for k, v in keys.items()))
        lines.extend(f"      {text}" for text in finding["texts"])
    if job:
        lines.append(f"Pipeline job {job.get('job_key')}: {job.get('state')}, stage seconds "
                     + json.dumps({s: round(t['finished'] - t['started'], 2) for s, t in job.get('timings', {}).items() if 'finished' in t}))
    return "\n".join(lines)
