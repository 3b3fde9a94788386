"""The background fsync of spool files (InstanceStore.begin_sync): durable before linking,
one pool per process, and a forked child (a Celery worker) gets a pool that runs."""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

import pytest

from dicom_node import ingest, storage
from dicom_node.storage import InstanceStore, StoreOutcome


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


def instance_files(store: InstanceStore) -> list[str]:
    """The spool and temporary files in .incoming (not the process's owner token)."""
    return sorted(p.name for p in store.incoming.iterdir() if p.suffix in (".dcm", ".part"))


def test_a_synced_spool_file_becomes_the_stored_file_itself(tmp_path):
    """No second temporary link: the stored file is the spool file's inode, which stays for its
    owner (pynetdicom) to remove."""
    store = InstanceStore(tmp_path / "store")
    source = spooled(store, "rx-1.dcm")
    result = store.store_file("1.2", "1.2.3", "1.2.3.4", source, synced=store.begin_sync(source))
    assert result.outcome is StoreOutcome.STORED
    assert os.path.samefile(result.path, source)
    assert instance_files(store) == ["rx-1.dcm"]


@pytest.mark.parametrize("policy, outcome", [
    ("replace", StoreOutcome.CONFLICT_REPLACED),
    ("keep_first", StoreOutcome.CONFLICT_KEPT_FIRST),
    ("reject", StoreOutcome.CONFLICT_REJECTED),
])
def test_a_synced_conflicting_copy_is_handled_by_policy_and_the_spool_file_left(tmp_path, policy, outcome):
    store = InstanceStore(tmp_path / "store", duplicate_policy=policy)
    first = spooled(store, "rx-1.dcm", b"first" * 100)
    store.store_file("1.2", "1.2.3", "1.2.3.4", first, synced=store.begin_sync(first))
    first.unlink()  # as its owner does after the handler
    second = spooled(store, "rx-2.dcm", b"second" * 100)
    result = store.store_file("1.2", "1.2.3", "1.2.3.4", second, synced=store.begin_sync(second))
    assert result.outcome is outcome
    assert result.path.read_bytes() == (b"second" * 100 if policy == "replace" else b"first" * 100)
    kept = {p.read_bytes() for p in store.conflicts.iterdir()}
    assert kept == (set() if policy == "reject" else {b"first" * 100} if policy == "replace" else {b"second" * 100})
    assert second.read_bytes() == b"second" * 100  # still there for its owner
    assert instance_files(store) == ["rx-2.dcm"]  # no .part left


def test_a_failed_fsync_stores_nothing(tmp_path):
    store = InstanceStore(tmp_path / "store")
    source = spooled(store, "rx-1.dcm")
    failed: Future = Future()
    failed.set_exception(OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output"):
        store.store_file("1.2", "1.2.3", "1.2.3.4", source, synced=failed)
    assert not store.path_for("1.2", "1.2.3", "1.2.3.4").exists()


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


def test_the_scp_begins_each_spool_files_fsync_as_its_data_set_completes(node, ct_study, monkeypatch):
    """Over a real association: the handler is given the fsync the front door began (on its own
    descriptor), done without error by the time the instance is stored."""
    from dicom_node.ingest import Ingestor

    from .conftest import NODE_AE, run_tool

    given = []
    original = Ingestor.ingest_file

    def recording(self, path, *args, synced=None, **kwargs):
        given.append(synced)
        result = original(self, path, *args, synced=synced, **kwargs)
        given.append(synced.done() and synced.exception() is None)
        return result

    monkeypatch.setattr(Ingestor, "ingest_file", recording)
    _, paths = ct_study
    run_tool("/usr/bin/storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    assert len(given) == 2 * len(paths)
    assert all(isinstance(future, Future) for future in given[0::2])  # begun by the front door, not by the ingest
    assert all(given[1::2])


def test_the_scp_parses_each_small_spool_file_from_the_bytes_it_wrote(node, ct_study, monkeypatch):
    """The handler is given the spool file's bytes, read back on the front door's descriptor
    (no second open of the file): exactly what is in the file."""
    from dicom_node.ingest import Ingestor

    from .conftest import NODE_AE, run_tool

    given = []
    original = Ingestor.ingest_file

    def recording(self, path, *args, contents=None, **kwargs):
        given.append((Path(path).read_bytes(), contents))
        return original(self, path, *args, contents=contents, **kwargs)

    parsed = []
    real_parse = ingest._parse_source
    monkeypatch.setattr(ingest, "_parse_source", lambda source: parsed.append(type(source)) or real_parse(source))
    monkeypatch.setattr(Ingestor, "ingest_file", recording)
    _, paths = ct_study
    run_tool("/usr/bin/storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    assert len(given) == len(paths)
    assert all(contents is not None and contents == on_disk for on_disk, contents in given)
    assert all(on_disk.endswith(sent.read_bytes()[-1000:]) for (on_disk, _), sent in zip(given, paths))
    assert parsed == [bytes] * len(paths)  # parsed from them, not from the path


def test_free_space_is_read_at_most_once_a_second_unless_it_is_near_the_threshold(tmp_path, monkeypatch):
    import shutil
    import time

    from dicom_node import storage

    reads = []
    free = {"bytes": 100 << 30}

    def disk_usage(path):
        reads.append(path)
        return shutil._ntuple_diskusage(200 << 30, (200 << 30) - free["bytes"], free["bytes"])

    monkeypatch.setattr(storage.shutil, "disk_usage", disk_usage)
    store = InstanceStore(tmp_path / "store", min_free_bytes=10 << 30)
    assert [store.free_bytes() for _ in range(5)] == [100 << 30] * 5
    assert len(reads) == 1  # far above the threshold: one reading serves the second
    clock = time.monotonic()
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock + storage.FREE_SPACE_RECHECK_SECONDS)
    free["bytes"] = (10 << 30) + (512 << 20)  # within the 1 GiB margin: read before each instance
    assert store.free_bytes() == free["bytes"]
    free["bytes"] = (10 << 30) - 1
    assert store.free_bytes() < store.min_free_bytes
    assert len(reads) == 3


def test_a_series_folder_removed_after_it_was_made_is_made_again(tmp_path, monkeypatch):
    """The store remembers the folders it made (no stat per instance); when another process
    removed them since (prior-cache eviction empties its study folders), they are made again,
    each new entry fsynced, and nothing is lost."""
    store = InstanceStore(tmp_path / "store")
    first = store.store_file("1.2", "1.2.3", "1.2.3.4", spooled(store, "rx-1.dcm"))
    series = first.path.parent
    first.path.unlink()
    series.rmdir()
    series.parent.rmdir()  # the study folder too
    synced = []
    monkeypatch.setattr(storage, "fsync_dir", lambda directory: synced.append(Path(directory)))
    again = store.store_file("1.2", "1.2.3", "1.2.3.5", spooled(store, "rx-2.dcm", b"y" * 500))
    assert again.outcome is StoreOutcome.STORED and again.path.parent == series
    assert {series.parent.parent, series.parent, series} <= set(synced)  # each made level's entry, and the file's
    in_memory = store.store("1.2", "1.2.3", "1.2.3.6", b"z" * 300)
    assert in_memory.outcome is StoreOutcome.STORED
    assert sorted(p.read_bytes()[:1] for p in series.iterdir()) == [b"y", b"z"]
