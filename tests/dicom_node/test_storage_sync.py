"""The background fsync of spool files (InstanceStore.begin_sync): durable before linking,
one pool per process, and a forked child (a Celery worker) gets a pool that runs."""

from __future__ import annotations

import os

from dicom_node import storage
from dicom_node.storage import InstanceStore


def spooled(store: InstanceStore, name: str, data: bytes = b"x" * 1000):
    path = store.incoming / name
    path.write_bytes(data)
    return path


def test_a_spool_file_is_linked_into_place_after_its_background_fsync(tmp_path):
    store = InstanceStore(tmp_path / "store")
    source = spooled(store, "rx-1.dcm")
    synced = store.begin_sync(source)
    result = store.store_file("1.2", "1.2.3", "1.2.3.4", source, synced=synced)
    assert synced.done() and synced.exception() is None
    assert result.path.read_bytes() == source.read_bytes()
    assert oct(result.path.stat().st_mode & 0o777) == oct(storage.FILE_MODE)


def test_stores_share_one_pool_per_process(tmp_path):
    first, second = InstanceStore(tmp_path / "a"), InstanceStore(tmp_path / "b")
    first.begin_sync(spooled(first, "rx-a.dcm")).result(5)
    pool = storage._sync_pool()
    second.begin_sync(spooled(second, "rx-b.dcm")).result(5)
    assert storage._sync_pool() is pool


def test_a_forked_child_fsyncs_on_a_pool_of_its_own(tmp_path):
    store = InstanceStore(tmp_path / "store")
    store.begin_sync(spooled(store, "rx-parent.dcm")).result(5)  # the parent's pool has threads now
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool threads do not exist here
        try:
            store.begin_sync(spooled(store, "rx-child.dcm")).result(5)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
