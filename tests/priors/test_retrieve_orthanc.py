"""Prior retrieval against a real Orthanc: selection over a seeded history, C-MOVE, C-GET and
DICOMweb retrieval, prior reports, the cache, and every fault the issue lists."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from dicom_node.priors import (
    ArchiveUnavailable,
    explain_priors,
    release_priors,
    retrieve_priors,
)
from dicom_node import frontdoor
from dicom_node.priors import archive as archive_module
from dicom_node.priors.cache import evict_priors
from tests.support.procs import free_port
from tests.support.waiting import wait_until

from .conftest import JANE, ingest_current, ingest_study, prior_settings
from .history import Patient, Study

pytestmark = pytest.mark.integration


def rules_by_study(result) -> dict[str, tuple[bool, str]]:
    return {d.study_uid: (d.kept, d.rule) for d in result.candidates}


def stored_studies(node) -> set[str]:
    root = node.settings.storage_dir
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def test_cmove_chooses_the_matching_prior_and_explains_every_candidate(archive, node, worker_for):
    h = archive.history
    archive.register(node)
    current = ingest_current(node, archive)
    settings = prior_settings(node, archive.config("c-move"))
    worker = worker_for(node)

    result = retrieve_priors(settings, worker.index, worker.ingestor, current)

    assert not result.no_prior
    assert [p.study_uid for p in result.chosen] == [h.recent.uid]
    prior = result.chosen[0]
    # Both current series (PA, LATERAL) have their matching prior series; the SR is a report, not an image.
    image_series = h.recent.series_uids[:2]
    assert sorted(prior.series_uids) == sorted(image_series)
    assert len(prior.instance_paths) == 4 and all(p.is_file() for p in prior.instance_paths)
    assert all(Path(p).parent.name in image_series for p in prior.instance_paths)
    assert prior.modality == "DX" and prior.body_part == "CHEST" and prior.archive == "pacs"
    assert prior.accession_number == "ACC090" and prior.study_date == "20231115"
    # The radiologist's report is context; the node's own earlier result is not.
    assert prior.report_text is not None and "Small left pleural effusion" in prior.report_text
    assert "Impression: See findings." in prior.report_text
    assert "AI comparison" not in prior.report_text
    assert prior.report_series_uids == [h.recent.series_uids[2]]
    assert not prior.reused_from_cache and prior.missing_instances == 0

    rules = rules_by_study(result)
    assert rules[h.recent.uid] == (True, "kept: most recent matching prior (1 of 1)")
    assert rules[h.current.uid] == (False, "the current study itself")
    assert rules[h.older_cr.uid] == (False, "older than the 1 most recent matching prior(s)")
    assert rules[h.ap_only.uid][1].startswith("view differs: AP")
    assert rules[h.ct.uid][1].startswith("modality differs: CT")
    assert rules[h.hand.uid][1].startswith("body part differs: HAND")
    assert rules[h.same_day_later.uid][1].startswith("not earlier")
    assert rules[h.node_only.uid] == (False, "only the node's own result objects")
    # Never another patient: not the namesake (other PatientID), not the same ID from another issuer.
    assert h.namesake.uid not in rules
    assert not rules.get(h.other_issuer.uid, (False, ""))[0]
    # Outside the window the archive is not even asked; a malformed date never passes.
    assert h.too_old.uid not in rules
    if h.bad_date.uid in rules:
        assert rules[h.bad_date.uid] == (False, "malformed archive answer: StudyDate '2023' is not a date")

    # Only the chosen series came over; the prior is registered and never queued for analysis.
    assert stored_studies(node) == {current, h.recent.uid}
    prior_row = wait_until(lambda: (r := worker.index.study(h.recent.uid)) and r["state"] == "complete" and r, what="prior complete")
    assert prior_row["is_prior"]
    assert all(row.study_uid != h.recent.uid for row in worker.index.outbox_rows())
    assert [e["study_uid"] for e in worker.index.prior_cache()] == [h.recent.uid]

    # Present already: reused without retrieving (a C-MOVE now would fail: the archive has a dead port for us).
    archive.register(node, port=free_port())
    again = retrieve_priors(settings, worker.index, worker.ingestor, current)
    assert [p.study_uid for p in again.chosen] == [h.recent.uid]
    assert again.chosen[0].reused_from_cache and len(again.chosen[0].instance_paths) == 4


def test_explain_prints_each_candidate_with_its_rule_and_retrieves_nothing(archive, node):
    h = archive.history
    archive.register(node)
    current = ingest_current(node, archive)
    text = explain_priors(prior_settings(node, archive.config("c-move")), current)
    lines = text.splitlines()

    def line_of(study: Study) -> str:
        index = next(i for i, line in enumerate(lines) if line.lstrip().startswith(("KEPT", "dropped")) and line.endswith(study.uid))
        return lines[index] + " | " + lines[index + 1].strip()

    assert line_of(h.recent).lstrip().startswith("KEPT") and "most recent matching prior" in line_of(h.recent)
    assert "view differs" in line_of(h.ap_only)
    assert "modality differs" in line_of(h.ct)
    assert "body part differs" in line_of(h.hand)
    assert "the current study itself" in line_of(h.current)
    assert JANE.patient_id not in text  # patient IDs are hashed
    assert stored_studies(node) == {current}


def test_cget_retrieves_recent_and_baseline_in_one_association(archive, node, worker_for, monkeypatch):
    h = archive.history
    archive.register(node, port=free_port())  # known caller; C-GET needs no reachable move destination
    current = ingest_current(node, archive)
    settings = prior_settings(node, archive.config("c-get"), include_baseline=True)
    worker = worker_for(node)
    opened = []
    real_associate = archive_module.associate

    def counting_associate(ae, *args, **kwargs):
        opened.append([c.abstract_syntax for c in ae.requested_contexts])
        return real_associate(ae, *args, **kwargs)

    monkeypatch.setattr(archive_module, "associate", counting_associate)
    durable = []  # how each received instance is made durable: its spool file's own fsync (as on the SCP)
    real_ingest_file = type(worker.ingestor).ingest_file

    def recording_ingest_file(self, path, *args, make_durable=None, **kwargs):
        durable.append(make_durable)
        return real_ingest_file(self, path, *args, make_durable=make_durable, **kwargs)

    monkeypatch.setattr(type(worker.ingestor), "ingest_file", recording_ingest_file)

    result = retrieve_priors(settings, worker.index, worker.ingestor, current)

    assert durable and all(isinstance(getattr(f, "__self__", None), frontdoor._SpoolHandle) for f in durable)
    get_associations = [c for c in opened if StudyRootQueryRetrieveInformationModelGet in c]
    assert len(get_associations) == 1  # 4 series of 2 studies (images and a report) over one association

    assert [(p.study_uid, p.role) for p in result.chosen] == [(h.recent.uid, "recent"), (h.older_cr.uid, "baseline")]
    recent, baseline = result.chosen
    assert len(recent.instance_paths) == 4 and "Small left pleural effusion" in recent.report_text
    # CR counts as DX, THORAX as CHEST; the one PA series is the match for both current series.
    assert baseline.modality == "CR" and len(baseline.instance_paths) == 1 and baseline.report_text is None
    assert rules_by_study(result)[h.older_cr.uid][1].startswith("kept: baseline")
    assert {p.study_uid for p in result.chosen} <= {e["study_uid"] for e in worker.index.prior_cache()}
    assert not result.warnings


def test_dicomweb_retrieves_with_qido_and_wado(archive, node, worker_for):
    h = archive.history
    current = ingest_current(node, archive)
    settings = prior_settings(node, archive.config("dicomweb"))
    worker = worker_for(node)

    result = retrieve_priors(settings, worker.index, worker.ingestor, current)

    assert [p.study_uid for p in result.chosen] == [h.recent.uid]
    prior = result.chosen[0]
    assert len(prior.instance_paths) == 4 and all(p.is_file() for p in prior.instance_paths)
    assert "Small left pleural effusion" in prior.report_text
    rules = rules_by_study(result)
    assert rules[h.ap_only.uid][1].startswith("view differs")
    assert h.namesake.uid not in rules
    assert worker.index.study(h.recent.uid)["is_prior"]


# --- faults ------------------------------------------------------------------------------------


def test_archive_down_is_unavailable_at_once_for_the_pipeline_to_retry(archive, node, worker_for):
    current = ingest_current(node, archive)
    down = archive.config("c-move", port=free_port())
    settings = prior_settings(node, down)
    worker = worker_for(node)
    with pytest.raises(ArchiveUnavailable) as failure:  # transient: retried by time (tests/pipeline)
        retrieve_priors(settings, worker.index, worker.ingestor, current)
    assert "study query failed" in str(failure.value) and "could not connect" in str(failure.value)
    assert worker.index.prior_cache() == []


def test_association_refused_is_an_unavailable_archive_with_the_reason(archive, node, worker_for):
    current = ingest_current(node, archive)
    settings = prior_settings(node, archive.config("c-move", ae_title="NOT_ORTHANC"))
    worker = worker_for(node)
    with pytest.raises(ArchiveUnavailable) as failure:
        retrieve_priors(settings, worker.index, worker.ingestor, current)
    message = str(failure.value)
    assert "NOT_ORTHANC@127.0.0.1" in message
    assert "called AE title not recognised" in message  # even when the reject beats pynetdicom's ACSE


def test_optional_archive_down_is_a_warning_and_the_next_archive_is_queried(archive, node, worker_for):
    archive.register(node)
    current = ingest_current(node, archive)
    down = archive.config("c-move", name="old-pacs", port=free_port(), required=False)
    settings = prior_settings(node, down, archive.config("c-move"))
    worker = worker_for(node)
    result = retrieve_priors(settings, worker.index, worker.ingestor, current)
    assert [p.study_uid for p in result.chosen] == [archive.history.recent.uid]
    assert any("old-pacs" in w and "not required" in w for w in result.warnings)


def test_unregistered_calling_ae_is_an_unavailable_archive_that_says_so(archive, node, worker_for):
    archive.unregister()
    current = ingest_current(node, archive)
    settings = prior_settings(node, archive.config("c-move"))
    worker = worker_for(node)
    with pytest.raises(ArchiveUnavailable) as failure:
        retrieve_priors(settings, worker.index, worker.ingestor, current)
    assert "aborted the association during C-FIND" in str(failure.value)
    assert "register the node's AE title in the PACS" in str(failure.value)


def test_unreachable_move_destination_says_to_register_the_node_and_is_retried(archive, node, worker_for):
    # The archive answers queries from QUERIER but does not know DICOM_NODE as a destination. Orthanc
    # answers 0xC000 exactly as when the node is briefly down, so it is transient, with the advice.
    archive.unregister()
    archive.register(node, name="querier", ae_title="QUERIER")
    current = ingest_current(node, archive)
    settings = prior_settings(node, archive.config("c-move", calling_ae_title="QUERIER"), node_address="10.1.2.3:11112")
    worker = worker_for(node)
    try:
        with pytest.raises(ArchiveUnavailable) as failure:
            retrieve_priors(settings, worker.index, worker.ingestor, current)
    finally:
        archive.unregister("querier")
    message = str(failure.value)
    assert "0xC000" in message and "Register the node" in message and "Retried" in message
    assert node.settings.ae_title in message and "10.1.2.3:11112" in message
    assert stored_studies(node) == {current}


def test_partial_move_records_a_warning_and_uses_what_arrived(archive, make_node, worker_for):
    h = archive.history
    node = make_node(duplicate_policy="reject")
    archive.register(node)
    current = ingest_current(node, archive)
    # A stale, different file where one prior instance must land: the node refuses that one C-STORE.
    victim = next(p for p in archive.files[h.recent.uid] if p.parent.name == h.recent.uid)
    from pydicom import dcmread

    ds = dcmread(victim)
    target = node.store.path_for(h.recent.uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    target.parent.mkdir(parents=True)
    target.write_bytes(b"stale bytes from a broken disk")
    settings = prior_settings(node, archive.config("c-move"))
    worker = worker_for(node)

    result = retrieve_priors(settings, worker.index, worker.ingestor, current)

    prior = result.chosen[0]
    assert not result.no_prior and prior.study_uid == h.recent.uid
    # Orthanc stops a C-MOVE at the first failed C-STORE: the victim and whatever came after it is missing.
    assert 1 <= prior.missing_instances <= 2
    assert any("C-MOVE failed with status 0xC000 after the archive connected to us" in w for w in result.warnings)
    assert any(w.startswith("partial retrieve:") and f"series {ds.SeriesInstanceUID}" in w for w in result.warnings)
    arrived = {row["path"] for row in worker.index.study_instances(h.recent.uid)}
    assert prior.instance_paths and {str(p) for p in prior.instance_paths} <= arrived
    assert target not in prior.instance_paths and len(prior.instance_paths) == 4 - prior.missing_instances


def test_no_prior_at_all_proceeds_in_no_prior_mode(archive, node, worker_for):
    archive.register(node)
    lonely = Study(Patient("PAT555", "NEW^PATIENT", "19900101", issuer="HOSP_A"), "20240601", "DX", "CHEST", "XR CHEST PA", "N1")
    ingest_study(node, lonely)
    settings = prior_settings(node, archive.config("c-move"))
    worker = worker_for(node)
    result = retrieve_priors(settings, worker.index, worker.ingestor, lonely.uid)
    assert result.no_prior and result.chosen == [] and result.candidates == []
    assert "no prior available: the comparison proceeds without one" in result.warnings


def test_patient_id_shared_by_two_issuers_without_issuer_on_current_study_is_refused(archive, node, worker_for):
    # The current study names no issuer; the archive has PAT001 under HOSP_A and HOSP_B (same birth date).
    archive.register(node)
    anonymous_issuer = Patient("PAT001", "DOE^JANE", "19600101", issuer="")
    current = Study(anonymous_issuer, "20240610", "DX", "CHEST", "XR CHEST PA", "ACC200", views=("PA",))
    ingest_study(node, current)
    settings = prior_settings(node, archive.config("c-move"))
    worker = worker_for(node)
    result = retrieve_priors(settings, worker.index, worker.ingestor, current.uid)
    assert result.no_prior
    assert any("ambiguous PatientID" in w and "HOSP_A" in w and "HOSP_B" in w for w in result.warnings)
    assert all(not d.kept for d in result.candidates)


# --- cache -------------------------------------------------------------------------------------


def test_cache_evicts_least_recently_used_unleased_priors_only(archive, node, worker_for):
    h = archive.history
    archive.register(node)
    current = ingest_current(node, archive)
    settings = prior_settings(node, archive.config("c-move"), include_baseline=True, cache_budget_mb=0.001)
    worker = worker_for(node)

    result = retrieve_priors(settings, worker.index, worker.ingestor, current)
    # Over budget, but both priors are leased by this comparison: nothing is evicted.
    assert result.evicted == [] and any("over its budget" in w for w in result.warnings)
    assert {p.study_uid for p in result.chosen} == {h.recent.uid, h.older_cr.uid}

    release_priors(worker.index, result)
    entries = {e["study_uid"]: e for e in worker.index.prior_cache()}
    worker.index.mark_prior(h.recent.uid, lease_seconds=0, now=entries[h.recent.uid]["last_used_at"] + 5)  # used later
    recent_bytes = worker.index.prior_cache()[-1]["bytes"]
    baseline_paths = next(p for p in result.chosen if p.role == "baseline").instance_paths

    eviction = evict_priors(worker.index, recent_bytes, node.settings.storage_dir, now=entries[h.recent.uid]["last_used_at"] + 10)

    assert eviction.evicted == [h.older_cr.uid]  # least recently used goes first, and only as much as needed
    assert not any(p.exists() for p in baseline_paths)
    assert not (node.settings.storage_dir / h.older_cr.uid).exists()
    assert worker.index.study(h.older_cr.uid) is None and worker.index.study_instances(h.older_cr.uid) == []
    assert [e["study_uid"] for e in worker.index.prior_cache()] == [h.recent.uid]

    # A budget of zero removes the rest of the priors, never the current (non-prior) study.
    evict_priors(worker.index, 0, node.settings.storage_dir, now=entries[h.recent.uid]["last_used_at"] + 10)
    assert stored_studies(node) == {current}
    assert len(worker.index.study_instances(current)) == 2

    # Fetched again after eviction, through the running SCP that had indexed these series before.
    again = retrieve_priors(settings.model_copy(update={"priors": settings.priors.model_copy(update={"cache_budget_mb": 1000})}),
                            worker.index, worker.ingestor, current)
    assert {p.study_uid for p in again.chosen} == {h.recent.uid, h.older_cr.uid}
    assert all(len(p.instance_paths) >= 1 and all(f.is_file() for f in p.instance_paths) for p in again.chosen)
    assert not any(p.reused_from_cache for p in again.chosen) and not again.warnings


def test_dicomweb_archive_down_is_unavailable(archive, node, worker_for):
    current = ingest_current(node, archive)
    dead = archive.config("dicomweb", dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web")
    settings = prior_settings(node, dead)
    worker = worker_for(node)
    with pytest.raises(ArchiveUnavailable, match="study query failed"):
        retrieve_priors(settings, worker.index, worker.ingestor, current)


def test_result_serialises_for_the_pipeline(archive, node, worker_for):
    import dataclasses
    import json

    archive.register(node)
    current = ingest_current(node, archive)
    worker = worker_for(node)
    result = retrieve_priors(prior_settings(node, archive.config("c-move")), worker.index, worker.ingestor, current)
    data = json.loads(json.dumps(dataclasses.asdict(result), default=str))
    assert data["no_prior"] is False and data["chosen"][0]["study_uid"] == archive.history.recent.uid
    assert {"study_uid", "kept", "rule"} <= set(data["candidates"][0])


def test_disabled_or_unconfigured_prior_retrieval_says_why_without_touching_an_archive(archive, node, worker_for):
    current = ingest_current(node, archive)
    worker = worker_for(node)
    disabled = prior_settings(node, archive.config("c-move"), enabled=False)
    result = retrieve_priors(disabled, worker.index, worker.ingestor, current)
    assert result.no_prior and result.warnings[0] == "prior retrieval is disabled (priors.enabled=false)"
    result = retrieve_priors(prior_settings(node), worker.index, worker.ingestor, current)
    assert result.no_prior and result.warnings[0] == "no archive configured (priors.archives is empty)"
    with pytest.raises(LookupError, match="is not in the index"):
        explain_priors(prior_settings(node, archive.config("c-move")), "1.2.3.4")
