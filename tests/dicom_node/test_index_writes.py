"""The two statements each received instance runs (the instance row, its study's activity), on
SQLite and PostgreSQL: they go through the driver directly (index._DriverStatement), so check
what they write, duplicates and booleans included."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import threading
import time

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine.interfaces import CacheStats
from sqlalchemy.exc import IntegrityError

from dicom_node.index import Index, InstanceRecord, _FileLock, associations, instances, patients, series, studies


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'index.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    index = Index(url, fast_instance_commits=True)
    yield index
    index.dispose()  # before postgres_url drops the database


def record(number: int, **changes) -> InstanceRecord:
    fields = dict(
        patient_id="P1", issuer_of_patient_id="", patient_name="DOE^JANE", birth_date="19600101",
        study_uid="1.2.826.0.1.1", study_date="20260101", study_time="101010", accession_number="A1",
        study_description="CT CHEST", series_uid="1.2.826.0.1.1.1", modality="", body_part="CHEST",
        series_number="1", series_description="AX", sop_instance_uid=f"1.2.826.0.1.1.1.{number}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        instance_number=str(number), view_position="", laterality="", analysable=True,
        path=f"/store/{number}.dcm", size=1000 + number,
    )
    return InstanceRecord(**{**fields, **changes})


def row(index: Index, table, **where) -> dict:
    (column, value), = where.items()
    with index.engine.connect() as conn:
        return dict(conn.execute(select(table).where(table.c[column] == value)).mappings().one())


def test_an_instance_row_is_written_once_and_a_duplicate_is_told_apart(index):
    assert index.record_instances([record(1), record(2)], now=100.0) == [True, True]
    assert index.record_instances([record(2, path="/elsewhere"), record(3)], now=101.0) == [False, True]
    written = row(index, instances, sop_instance_uid="1.2.826.0.1.1.1.2")
    assert written["path"] == "/store/2.dcm" and written["size"] == 1002 and written["received_at"] == 100.0
    assert written["analysable"] is True
    assert row(index, instances, sop_instance_uid="1.2.826.0.1.1.1.3")["received_at"] == 101.0


def test_a_non_image_instance_is_written_without_touching_its_study(index):
    index.record_instances([record(1, analysable=False, modality="SR")], now=100.0)
    assert row(index, instances, sop_instance_uid="1.2.826.0.1.1.1.1")["analysable"] is False
    study = row(index, studies, study_uid="1.2.826.0.1.1")
    assert study["modality"] == "" and study["last_received_at"] == 100.0


def test_each_image_updates_its_studys_activity(index):
    index.record_instances([record(1)], now=100.0)  # no modality yet: the next image's is taken
    index.record_instances([record(2, modality="CT")], now=105.0)
    index.record_instances([record(3, modality="MR", urgent=True)], now=110.0)
    index.record_instances([record(4)], now=111.0)  # urgent stays
    study = row(index, studies, study_uid="1.2.826.0.1.1")
    assert (study["modality"], study["urgent"], study["state"]) == ("CT", True, "receiving")
    assert (study["first_received_at"], study["last_received_at"], study["reanalysis"]) == (100.0, 111.0, False)


def test_a_new_image_reopens_a_completed_study_for_reanalysis(index):
    index.record_instances([record(1, modality="CT")], now=100.0)
    assert index.complete_study("1.2.826.0.1.1", now=200.0) is not None
    assert index.record_instances([record(1)], now=300.0) == [False]  # a resend reopens nothing
    assert row(index, studies, study_uid="1.2.826.0.1.1")["state"] == "complete"
    index.record_instances([dataclasses.replace(record(2), modality="CT")], now=400.0)
    study = row(index, studies, study_uid="1.2.826.0.1.1")
    assert (study["state"], study["reanalysis"], study["first_received_at"], study["last_received_at"]) == (
        "receiving", True, 400.0, 400.0)


def compiled_by_a_first_association(index: Index) -> list[str]:
    """The statements SQLAlchemy compiles (finds not in its cache) while an association brings
    a new series' first instance and the study assembler looks for studies being received."""
    compiled = []

    def note(conn, cursor, statement, parameters, context, executemany):
        if context is not None and context.cache_hit is CacheStats.CACHE_MISS:
            compiled.append(" ".join(statement.split()[:3]))

    event.listen(index.engine, "before_cursor_execute", note)
    try:
        audit_id = index.open_association("CT01", "NODE", "10.0.0.7", 4100, "accepted")
        index.record_instances([record(1)], now=100.0)
        index.close_association(audit_id, "released", 1, 0)
        index.receiving_studies()
    finally:
        event.remove(index.engine, "before_cursor_execute", note)
    return compiled


def test_a_fresh_index_compiles_statements_on_its_first_association(index):
    assert len(compiled_by_a_first_association(index)) >= 4  # parent rows, audit row and its end, the query


def test_warm_up_compiles_them_beforehand_and_writes_nothing(index):
    index.warm_up()
    with index.engine.connect() as conn:
        for table in (patients, studies, series, instances, associations):
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0, table.name
    assert compiled_by_a_first_association(index) == []
    assert row(index, series, series_uid="1.2.826.0.1.1.1")["study_uid"] == "1.2.826.0.1.1"  # written as before


def test_an_instance_row_the_database_refuses_raises_sqlalchemys_integrity_error(index):
    """The instance statement runs on the driver's cursor (SQLite) or through exec_driver_sql:
    either way a refused row is SQLAlchemy's IntegrityError, which record_instances and the
    commit group handle, and nothing of its transaction stays."""
    index.record_instances([record(1)], now=100.0)
    with pytest.raises(IntegrityError):  # NOT NULL: the statement itself refuses it
        index.record_instances([record(2, path=None)], now=101.0)
    assert index.record_instances([record(2)], now=102.0) == [True]
    assert row(index, instances, sop_instance_uid="1.2.826.0.1.1.1.2")["received_at"] == 102.0


def test_a_series_whose_rows_another_process_deleted_is_written_again(index):
    """The instance insert fails on its foreign key (this process thought the series rows were
    there); record_instances writes them again and retries."""
    index.record_instances([record(1)], now=100.0)
    with index.engine.begin() as conn:  # as the other process's prior-cache eviction does
        for table in (instances, series, studies):
            conn.execute(table.delete().where(table.c.study_uid == "1.2.826.0.1.1"))
    assert index.record_instances([record(2)], now=101.0) == [True]
    assert row(index, studies, study_uid="1.2.826.0.1.1")["last_received_at"] == 101.0


def test_sqlite_writes_wait_for_another_process_holding_the_write_lock_and_release_it(tmp_path):
    """The lock file next to the database serialises writers of several processes (a second
    descriptor here stands in for another process); the index keeps its own descriptor open
    between transactions, so each must also unlock it."""
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    other = os.open(tmp_path / "index.db.write-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        writer = threading.Thread(target=index.record_instances, args=([record(1)],))
        writer.start()
        time.sleep(0.3)
        assert writer.is_alive()  # waiting for the other process's transaction
        fcntl.flock(other, fcntl.LOCK_UN)
        writer.join(10)
        assert not writer.is_alive()
        assert row(index, instances, sop_instance_uid=record(1).sop_instance_uid)["path"] == "/store/1.dcm"
        index.record_instances([record(2)])
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: raises if still held
    finally:
        os.close(other)
        index.dispose()


def test_a_forked_process_takes_the_write_lock_on_a_descriptor_of_its_own(tmp_path):
    """An inherited descriptor shares its flock with the parent's: a child using it would pass
    a lock its parent holds (and unlock the parent's on the way out)."""
    lock = _FileLock(str(tmp_path / "index.db.write-lock"))
    with lock:
        pass  # the descriptor is open now, as in a worker that wrote before it forked
    with lock:
        child = os.fork()
        if child == 0:
            try:
                with lock:
                    os._exit(0)
            finally:
                os._exit(1)
        time.sleep(0.3)
        assert os.waitpid(child, os.WNOHANG) == (0, 0)  # still waiting for the parent's lock
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    lock.close()
