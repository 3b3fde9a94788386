"""Instance rows a power loss takes back are put back from the store at the next start.

A power loss cannot be made here, so its effect is: rows deleted from the index of a store
whose run did not stop cleanly (the mark left behind). The instances arrive over a real
association (storescu) into an in-process node; the fast commit mode is checked on the real
SQLite and PostgreSQL connections.
"""

from __future__ import annotations

import os
import time

import pytest
from sqlalchemy import delete

from dicom_node import recovery
from dicom_node.index import Index, instances
from tests.support.node import node_settings

from .conftest import NODE_AE, run_tool


def send(node, paths) -> None:
    run_tool("/usr/bin/storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))


def indexed(index: Index, study_uid: str) -> set[str]:
    return {row["sop_instance_uid"] for row in index.study_instances(study_uid)}


def take_back(index: Index, sop_uids: list[str]) -> None:
    with index.engine.begin() as conn:
        conn.execute(delete(instances).where(instances.c.sop_instance_uid.in_(sop_uids)))


def stored_then_stopped(make_node, ct_study, tmp_path):
    """A node that received the study over storescu and stopped: (settings, its index, study, uids)."""
    study_uid, paths = ct_study
    settings = node_settings(tmp_path)
    node = make_node(**settings.model_dump())
    send(node, paths)
    node.stop()
    uids = sorted(indexed(node.index, study_uid))
    assert len(uids) == len(paths)
    return settings, node.index, study_uid, uids


def test_rows_lost_after_an_unclean_stop_are_restored_before_the_node_listens(make_node, ct_study, tmp_path, caplog):
    settings, index, study_uid, uids = stored_then_stopped(make_node, ct_study, tmp_path)
    take_back(index, uids[:3])
    (settings.storage_dir / recovery.RUNNING_MARK).touch()  # as a power loss leaves it
    caplog.set_level("INFO", logger="dicom_node.recovery")
    again = make_node(**settings.model_dump())
    assert sorted(indexed(again.index, study_uid)) == uids
    assert any("recovery.after_unclean_stop" in r.getMessage() for r in caplog.records)
    again.stop()
    assert not (settings.storage_dir / recovery.RUNNING_MARK).exists()


def test_after_a_clean_stop_nothing_is_walked(make_node, ct_study, tmp_path):
    settings, index, study_uid, uids = stored_then_stopped(make_node, ct_study, tmp_path)
    assert not (settings.storage_dir / recovery.RUNNING_MARK).exists()
    take_back(index, uids[:1])
    again = make_node(**settings.model_dump())
    assert sorted(indexed(again.index, study_uid)) == uids[1:]


def test_only_series_folders_changed_near_the_newest_row_are_walked(make_node, ct_study, tmp_path):
    settings, index, study_uid, uids = stored_then_stopped(make_node, ct_study, tmp_path)
    take_back(index, uids[:1])
    series_folder = next(p for p in (settings.storage_dir / study_uid).iterdir() if p.is_dir())
    old = time.time() - recovery.MARGIN_SECONDS - 3600  # changed long before the newest surviving row
    os.utime(series_folder, (old, old))
    (settings.storage_dir / recovery.RUNNING_MARK).touch()
    again = make_node(**settings.model_dump())
    assert sorted(indexed(again.index, study_uid)) == uids[1:]


def test_sqlite_instance_rows_alone_are_committed_without_waiting_for_the_disk(tmp_path):
    from tests.dicom_node.test_commit_group import record

    index = Index(f"sqlite:///{tmp_path / 'index.db'}", fast_instance_commits=True)
    try:
        def level() -> int:  # PRAGMA synchronous of the writer connection: 1 NORMAL, 2 FULL
            return index._writer.connection.driver_connection.execute("PRAGMA synchronous").fetchone()[0]

        assert index.record_instance(record(1))
        assert level() == 1
        index.open_association("A", "B", "127.0.0.1", 104, "accepted")  # any other write
        assert level() == 2
        assert index.record_instance(record(2))
        assert level() == 1
    finally:
        index.dispose()


@pytest.mark.parametrize("commit", ["fast", "durable"])
def test_the_scp_index_follows_the_setting(make_node, commit):
    assert make_node(index_instance_commit=commit).index.fast_instance_commits is (commit == "fast")


def test_fast_instance_commits_work_on_postgresql(postgres_url, ct_study, tmp_path):
    """SET LOCAL synchronous_commit in the instance transaction (the test server runs with it
    off already, so only the statement and the path are checked here)."""
    from dicom_node.ingest import Ingestor
    from dicom_node.storage import InstanceStore

    _, paths = ct_study
    index = Index(postgres_url, fast_instance_commits=True)
    try:
        seen = []
        original = index._write

        def spying(fast_commit=False):
            seen.append(fast_commit)
            return original(fast_commit)

        index._write = spying  # type: ignore[method-assign]
        ingestor = Ingestor(InstanceStore(tmp_path / "pgstore"), index)
        assert ingestor.ingest(paths[0].read_bytes()).ok
        assert seen == [True]
        assert index.newest_instance_received_at() is not None
    finally:
        index.dispose()
