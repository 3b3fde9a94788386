"""A spool file made durable as it is: fsynced on its writer's own descriptor (the front door's
SpoolWriter.sync) just before it is linked into place, the store's file mode set; the stored
file is the spool file itself; a failed fsync stores nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_node import ingest, storage
from dicom_node.spool_writer import SpoolWriter
from dicom_node.storage import InstanceStore, StoreOutcome


def spooled(store: InstanceStore, name: str, data: bytes = b"x" * 1000) -> tuple[Path, SpoolWriter]:
    """A spool file in .incoming as the front door writes it (0600, still open, a write held)."""
    return spooled_on(store, name, data)[:2]


def spooled_on(store: InstanceStore, name: str, data: bytes = b"x" * 1000) -> tuple[Path, SpoolWriter, int]:
    """spooled, and the writer's descriptor."""
    path = store.incoming / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    writer = SpoolWriter(fd)
    writer.write(data)
    return path, writer, fd


def durable(writer: SpoolWriter):
    return lambda: writer.sync(storage.FILE_MODE)


def test_a_spool_file_is_made_durable_before_it_is_linked_into_place(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path / "store")
    source, writer, writer_fd = spooled_on(store, "rx-1.dcm")
    final = store.path_for("1.2", "1.2.3", "1.2.3.4")
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append((fd, final.exists())) or real_fsync(fd))
    result = store.store_file("1.2", "1.2.3", "1.2.3.4", source, make_durable=durable(writer))
    assert [linked for fd, linked in fsynced if fd == writer_fd] == [False]  # the writer's own, before the link
    assert result.path.read_bytes() == b"x" * 1000  # the held write went out first
    assert oct(result.path.stat().st_mode & 0o777) == oct(storage.FILE_MODE)
    writer.close()


def instance_files(store: InstanceStore) -> list[str]:
    """The spool and temporary files in .incoming (not the process's owner token)."""
    return sorted(p.name for p in store.incoming.iterdir() if p.suffix in (".dcm", ".part"))


def test_a_durable_spool_file_becomes_the_stored_file_itself(tmp_path):
    """No second temporary link: the stored file is the spool file's inode, which stays for its
    owner (pynetdicom) to remove."""
    store = InstanceStore(tmp_path / "store")
    source, writer = spooled(store, "rx-1.dcm")
    result = store.store_file("1.2", "1.2.3", "1.2.3.4", source, make_durable=durable(writer))
    assert result.outcome is StoreOutcome.STORED
    assert os.path.samefile(result.path, source)
    assert instance_files(store) == ["rx-1.dcm"]
    writer.close()


@pytest.mark.parametrize("policy, outcome", [
    ("replace", StoreOutcome.CONFLICT_REPLACED),
    ("keep_first", StoreOutcome.CONFLICT_KEPT_FIRST),
    ("reject", StoreOutcome.CONFLICT_REJECTED),
])
def test_a_durable_conflicting_copy_is_handled_by_policy_and_the_spool_file_left(tmp_path, policy, outcome):
    store = InstanceStore(tmp_path / "store", duplicate_policy=policy)
    first, first_writer = spooled(store, "rx-1.dcm", b"first" * 100)
    store.store_file("1.2", "1.2.3", "1.2.3.4", first, make_durable=durable(first_writer))
    first_writer.close()
    first.unlink()  # as its owner does after the handler
    second, second_writer = spooled(store, "rx-2.dcm", b"second" * 100)
    result = store.store_file("1.2", "1.2.3", "1.2.3.4", second, make_durable=durable(second_writer))
    second_writer.close()
    assert result.outcome is outcome
    assert result.path.read_bytes() == (b"second" * 100 if policy == "replace" else b"first" * 100)
    kept = {p.read_bytes() for p in store.conflicts.iterdir()}
    assert kept == (set() if policy == "reject" else {b"first" * 100} if policy == "replace" else {b"second" * 100})
    assert second.read_bytes() == b"second" * 100  # still there for its owner
    assert instance_files(store) == ["rx-2.dcm"]  # no .part left


def test_a_failed_fsync_stores_nothing(tmp_path):
    store = InstanceStore(tmp_path / "store")
    source, writer = spooled(store, "rx-1.dcm")

    def failing() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        store.store_file("1.2", "1.2.3", "1.2.3.4", source, make_durable=failing)
    assert not store.path_for("1.2", "1.2.3", "1.2.3.4").exists()
    writer.close()


def test_the_scp_makes_each_spool_file_durable_on_its_own_descriptor(node, ct_study, monkeypatch):
    """Over a real association: the handler's ingest is given the spool file's own fsync (the
    front door's handle), which it calls before linking each file into place."""
    from dicom_node import frontdoor
    from dicom_node.ingest import Ingestor

    from .conftest import NODE_AE, run_tool

    given, synced = [], []
    original = Ingestor.ingest_file
    real_sync = SpoolWriter.sync

    def recording(self, path, *args, make_durable=None, **kwargs):
        given.append(make_durable)
        return original(self, path, *args, make_durable=make_durable, **kwargs)

    monkeypatch.setattr(Ingestor, "ingest_file", recording)
    monkeypatch.setattr(SpoolWriter, "sync", lambda self, mode: synced.append(mode) or real_sync(self, mode))
    _, paths = ct_study
    run_tool("/usr/bin/storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    assert len(given) == len(paths)
    assert all(isinstance(getattr(f, "__self__", None), frontdoor._SpoolHandle) for f in given)
    assert synced == [storage.FILE_MODE] * len(paths)


def test_an_instance_whose_spool_file_cannot_be_fsynced_fails_and_nothing_is_stored(node, ct_study, monkeypatch):
    """A disk that fails the fsync: the C-STORE fails with a processing failure, no file is
    linked into the store and no row written, and the spool file is removed."""
    from .conftest import NODE_AE, run_tool

    def failing(self, mode):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(SpoolWriter, "sync", failing)
    _, paths = ct_study
    done = run_tool("/usr/bin/storescu", "-v", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), str(paths[0]),
                    check=False)
    assert "Status: 0x110)" in done.stderr, done.stderr  # 0x0110 Processing Failure
    store = node.settings.storage_dir
    assert not any(p.suffix == ".dcm" for p in store.rglob("*") if ".incoming" not in p.parts)
    assert not any(p.name.endswith(".rx.dcm") for p in (store / ".incoming").iterdir())
    assert node.index.counts()["instances"] == 0


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
    source, writer = spooled(store, "rx-1.dcm")
    first = store.store_file("1.2", "1.2.3", "1.2.3.4", source, make_durable=durable(writer))
    writer.close()
    series = first.path.parent
    first.path.unlink()
    series.rmdir()
    series.parent.rmdir()  # the study folder too
    synced = []
    monkeypatch.setattr(storage, "fsync_dir", lambda directory: synced.append(Path(directory)))
    source, writer = spooled(store, "rx-2.dcm", b"y" * 500)
    again = store.store_file("1.2", "1.2.3", "1.2.3.5", source, make_durable=durable(writer))
    writer.close()
    assert again.outcome is StoreOutcome.STORED and again.path.parent == series
    assert {series.parent.parent, series.parent, series} <= set(synced)  # each made level's entry, and the file's
    in_memory = store.store("1.2", "1.2.3", "1.2.3.6", b"z" * 300)
    assert in_memory.outcome is StoreOutcome.STORED
    assert sorted(p.read_bytes()[:1] for p in series.iterdir()) == [b"y", b"z"]
