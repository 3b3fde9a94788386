"""Study assembly: idle completion, per-modality rules, late instances, restart re-arming."""

from __future__ import annotations

import time
from io import BytesIO

import pytest
from pydicom.uid import generate_uid

from dicom_node.assembly import complete_due_studies
from dicom_node.config import Settings, StudyRule
from dicom_node.index import Index
from dicom_node.ingest import Ingestor
from dicom_node.storage import InstanceStore
from dicom_node.synthetic import ct_slice
from tests.support.waiting import wait_until

from .conftest import NODE_AE, run_tool


@pytest.fixture
def ingest(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    ingestor = Ingestor(InstanceStore(tmp_path / "store"), index)

    def receive(study_uid: str, series_uid: str, number: int, modality: str = "CT") -> None:
        ds = ct_slice(study_uid, series_uid, number)
        ds.Modality = modality
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        result = ingestor.ingest(buffer.getvalue())
        assert result.ok, result.message

    receive.index = index
    yield receive
    index.dispose()


def settings(**overrides) -> Settings:
    return Settings(study_idle_seconds=30, **overrides)


def test_study_completes_after_idle_time_and_is_queued_once(ingest):
    study, series = generate_uid(), generate_uid()
    for number in (1, 2, 3):
        ingest(study, series, number)
    now = time.time()
    assert complete_due_studies(ingest.index, settings(), now + 10) == []  # still within the idle time
    [row] = complete_due_studies(ingest.index, settings(), now + 31)
    assert (row.study_uid, row.reason, row.instance_count) == (study, "complete", 3)
    assert ingest.index.study(study)["state"] == "complete"
    assert complete_due_studies(ingest.index, settings(), now + 100) == []  # not queued twice


def test_new_instance_restarts_the_idle_timer(ingest):
    study, series = generate_uid(), generate_uid()
    ingest(study, series, 1)
    first = ingest.index.study(study)["last_received_at"]
    time.sleep(0.05)
    ingest(study, series, 2)
    assert ingest.index.study(study)["last_received_at"] > first
    assert complete_due_studies(ingest.index, settings(), first + 30.01) == []


def test_late_instance_reopens_study_for_reanalysis(ingest):
    study, series = generate_uid(), generate_uid()
    ingest(study, series, 1)
    [first] = complete_due_studies(ingest.index, settings(), time.time() + 31)
    ingest(study, series, 2)  # arrives after completion
    assert ingest.index.study(study)["state"] == "receiving"
    [second] = complete_due_studies(ingest.index, settings(), time.time() + 31)
    assert second.reason == "reanalysis"
    assert second.instance_count == 2
    assert second.instance_set_hash != first.instance_set_hash


def test_resent_identical_instance_does_not_reopen(ingest, tmp_path):
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study, series, 1)
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    ingestor = Ingestor(InstanceStore(tmp_path / "store"), ingest.index)
    assert ingestor.ingest(path.read_bytes()).ok
    complete_due_studies(ingest.index, settings(), time.time() + 31)
    assert ingestor.ingest(path.read_bytes()).ok
    assert ingest.index.study(study)["state"] == "complete"


def test_required_series_rule_waits_for_all_series(ingest):
    rules = settings(study_rules={"MR": StudyRule(required_series=2, force_complete_seconds=600)})
    study = generate_uid()
    ingest(study, generate_uid(), 1, modality="MR")
    now = time.time()
    assert complete_due_studies(ingest.index, rules, now + 60) == []  # idle, but one series missing
    ingest(study, generate_uid(), 1, modality="MR")
    assert [r.study_uid for r in complete_due_studies(ingest.index, rules, time.time() + 31)] == [study]


def test_forced_completion_timeout(ingest):
    rules = settings(study_rules={"MR": StudyRule(required_series=5, force_complete_seconds=120)})
    study = generate_uid()
    ingest(study, generate_uid(), 1, modality="MR")
    now = time.time()
    assert complete_due_studies(ingest.index, rules, now + 100) == []
    assert [r.study_uid for r in complete_due_studies(ingest.index, rules, now + 121)] == [study]


def test_restart_rearms_receiving_studies_from_the_index(ingest, tmp_path):
    study = generate_uid()
    ingest(study, generate_uid(), 1)
    ingest.index.dispose()
    # A new process: nothing in memory, only the database.
    reopened = Index(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        [row] = complete_due_studies(reopened, settings(), time.time() + 31)
        assert row.study_uid == study
    finally:
        reopened.dispose()


def test_assembler_thread_queues_study_received_over_the_network(node, ct_study):
    study_uid, paths = ct_study
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    rows = wait_until(node.index.outbox_rows, timeout=10, what="outbox row after the idle time")
    assert [(r.study_uid, r.instance_count, r.published_at) for r in rows] == [(study_uid, len(paths), None)]


def test_fetched_prior_completes_without_being_queued(ingest):
    study = generate_uid()
    ingest.index.mark_prior(study)  # registered before the retrieve, as the priors module does
    ingest(study, generate_uid(), 1)
    assert complete_due_studies(ingest.index, settings(), time.time() + 31) == []
    row = ingest.index.study(study)
    assert (row["state"], row["is_prior"]) == ("complete", True)
