"""Group commit: instances arriving together share one transaction; a bad row fails only its own."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from sqlalchemy.exc import IntegrityError

from dicom_node.commit_group import CommitGroup
from dicom_node.index import Index, InstanceRecord


def record(n: int, series: str = "1.2.3.1") -> InstanceRecord:
    return InstanceRecord(
        patient_id="P1", issuer_of_patient_id="", patient_name="A^B", birth_date="", study_uid="1.2.3",
        study_date="20260101", study_time="", accession_number="", study_description="", series_uid=series,
        modality="CT", body_part="", series_number="1", series_description="", sop_instance_uid=f"1.2.3.1.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=str(n),
        view_position="", laterality="", analysable=True, path=f"/store/{n}.dcm", size=1,
    )


@pytest.fixture
def index(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    yield index
    index.dispose()


def test_concurrent_instances_share_transactions_and_all_are_indexed(index, tmp_path):
    group = CommitGroup(index)
    start = threading.Barrier(8)
    results: dict[int, bool] = {}

    def send(thread: int) -> None:
        start.wait()
        for k in range(10):
            n = thread * 10 + k
            results[n] = group.commit(record(n), tmp_path)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: True for n in range(80)}
    assert len(index.study_instances("1.2.3")) == 80
    assert group.instances == 80
    assert group.groups < 80  # eight senders at once: some groups held several instances
    # The same instance again is indexed once, and reported as not new.
    assert group.commit(record(5), None) is False


def commit_as_one_group(index, first: tuple, others: list[tuple]) -> dict[str, object]:
    """Commit `first`, hold its leader inside the write, commit `others` meanwhile (so they form
    the next group together); each (name, record, folder) -> its outcome or exception."""
    group = CommitGroup(index)
    gate = threading.Event()
    outcomes: dict[str, object] = {}
    original = index.record_instances

    def slow_first(recs, now=None):
        if not gate.is_set():
            gate.set()
            threading.Event().wait(0.3)
        return original(recs, now)

    index.record_instances = slow_first  # type: ignore[method-assign]

    def send(name: str, rec: InstanceRecord, directory) -> None:
        try:
            outcomes[name] = group.commit(rec, directory)
        except Exception as exc:  # noqa: BLE001
            outcomes[name] = exc

    leader = threading.Thread(target=send, args=first)
    leader.start()
    gate.wait(5)
    followers = [threading.Thread(target=send, args=args) for args in others]
    for t in followers:
        t.start()
    for t in [leader, *followers]:
        t.join()
    return outcomes


def test_a_bad_row_fails_only_its_own_instance(index, tmp_path):
    bad = replace(record(99, series="1.2.3.9"), patient_id=None)  # NOT NULL: the transaction fails
    outcomes = commit_as_one_group(index, ("first", record(1), tmp_path), [
        ("good", record(2), tmp_path), ("bad", bad, tmp_path), ("good2", record(3), tmp_path)])
    assert outcomes["first"] is True and outcomes["good"] is True and outcomes["good2"] is True
    assert isinstance(outcomes["bad"], IntegrityError)
    assert {r["sop_instance_uid"] for r in index.study_instances("1.2.3")} == {"1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"}


def test_a_folder_that_cannot_be_fsynced_fails_only_its_instances_and_writes_no_row_for_them(index, tmp_path):
    gone = tmp_path / "removed-meanwhile"  # its fsync fails: the entry may not be durable
    outcomes = commit_as_one_group(index, ("first", record(1), tmp_path), [
        ("good", record(2), tmp_path), ("lost", record(3), gone)])
    assert outcomes["first"] is True and outcomes["good"] is True
    assert isinstance(outcomes["lost"], FileNotFoundError)
    assert {r["sop_instance_uid"] for r in index.study_instances("1.2.3")} == {"1.2.3.1.1", "1.2.3.1.2"}


def test_those_arriving_during_a_write_are_written_together_by_one_of_them(index, tmp_path):
    batches: list[list[str]] = []
    original = index.record_instances

    def counted(recs, now=None):
        batches.append(sorted(rec.sop_instance_uid for rec in recs))
        return original(recs, now)

    index.record_instances = counted  # type: ignore[method-assign]
    outcomes = commit_as_one_group(index, ("first", record(1), tmp_path), [
        (f"next{n}", record(n), tmp_path) for n in range(2, 6)])
    assert outcomes == {"first": True, **{f"next{n}": True for n in range(2, 6)}}
    # The first group is the leader's own instance; the four that waited meanwhile are one
    # group, led by one of them (nobody else wrote a transaction of their own).
    assert batches == [["1.2.3.1.1"], [f"1.2.3.1.{n}" for n in range(2, 6)]]
