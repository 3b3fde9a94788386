"""The spool file's writer: small writes wait for the next large one or a flush, each large one
goes straight to the file (never held), a short write is finished, close flushes, and sync makes
it all durable on its own descriptor."""

from __future__ import annotations

import os

import pytest

from dicom_node import spool_writer
from dicom_node.spool_writer import HOLD_BYTES, SpoolWriter


def opened(path) -> SpoolWriter:
    return SpoolWriter(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))


def test_small_writes_wait_and_go_out_with_the_next_large_one_in_one_system_call(tmp_path, monkeypatch):
    calls = []
    real_writev = os.writev
    monkeypatch.setattr(spool_writer.os, "writev", lambda fd, buffers: calls.append(len(buffers)) or real_writev(fd, buffers))
    path = tmp_path / "a.dcm"
    writer = opened(path)
    writer.write(b"\0" * 128 + b"DICM")
    writer.write(b"meta")
    assert path.read_bytes() == b"" and calls == []
    fragment = bytearray(b"F" * HOLD_BYTES)
    writer.write(memoryview(fragment))
    assert calls == [2]  # what was held, then the fragment
    assert path.read_bytes() == b"\0" * 128 + b"DICM" + b"meta" + bytes(fragment)
    writer.write(b"tail")
    writer.flush()
    assert path.read_bytes().endswith(b"Ftail") and calls == [2, 1]
    writer.close()
    assert writer.closed


def test_a_held_write_is_a_copy_of_the_callers_buffer(tmp_path):
    path = tmp_path / "a.dcm"
    writer = opened(path)
    buffer = bytearray(b"abc")
    writer.write(memoryview(buffer))
    buffer[:] = b"XYZ"  # a reader reusing its buffer before the flush
    writer.close()
    assert path.read_bytes() == b"abc"


def test_short_writes_are_finished(tmp_path, monkeypatch):
    """writev may write less than asked (a signal, a full pipe): the rest follows, in order."""
    real_writev = os.writev
    monkeypatch.setattr(spool_writer.os, "writev", lambda fd, buffers: real_writev(fd, [bytes(buffers[0][:7])]))
    path = tmp_path / "a.dcm"
    writer = opened(path)
    writer.write(b"header-")
    data = bytes(range(256)) * 40
    writer.write(data)
    writer.close()
    assert path.read_bytes() == b"header-" + data


def test_close_flushes_and_the_closed_writer_refuses_its_descriptor(tmp_path):
    path = tmp_path / "a.dcm"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    writer = SpoolWriter(fd)
    writer.write(b"small")
    writer.close()
    writer.close()  # twice: nothing more
    assert path.read_bytes() == b"small"
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError):
        writer.flush()


def test_the_file_is_read_back_whole_on_its_descriptor_held_writes_included(tmp_path):
    path = tmp_path / "a.dcm"
    writer = opened(path)
    data = bytes(range(256)) * 64
    writer.write(b"\0" * 128 + b"DICM")
    writer.write(data)
    writer.write(b"end")
    assert writer.size == 132 + len(data) + 3
    assert writer.read_all() == b"\0" * 128 + b"DICM" + data + b"end" == path.read_bytes()
    writer.close()


def test_a_spool_file_cut_short_behind_the_writers_back_is_an_error(tmp_path):
    path = tmp_path / "a.dcm"
    writer = opened(path)
    writer.write(b"x" * 5000)
    os.truncate(path, 100)
    with pytest.raises(OSError, match="shorter than the 5000 bytes"):
        writer.read_all()
    writer.close()


def test_thousands_of_tiny_writes_go_out_whole(tmp_path):
    """A peer may send a P-DATA-TF of thousands of one-byte fragments: what is held is one
    buffer (writev takes at most 1024)."""
    path = tmp_path / "a.dcm"
    writer = opened(path)
    for number in range(5000):
        writer.write(bytes([number % 251]))
    writer.flush()
    assert path.read_bytes() == bytes(number % 251 for number in range(5000))
    writer.close()


def test_size_counts_bytes_and_reading_back_leaves_the_writes_in_place(tmp_path):
    from array import array

    path = tmp_path / "a.dcm"
    writer = opened(path)
    words = array("I", range(2000))
    writer.write(memoryview(words))
    assert writer.size == 8000
    assert writer.read_all() == words.tobytes()
    writer.write(b"more")
    assert writer.read_all() == words.tobytes() + b"more"
    writer.close()


def test_a_closed_writer_refuses_writes(tmp_path):
    writer = opened(tmp_path / "a.dcm")
    writer.close()
    with pytest.raises(ValueError):
        writer.write(b"late")
    with pytest.raises(ValueError):
        writer.read_all()
    with pytest.raises(ValueError):  # never an fsync or chmod of a descriptor number reused since
        writer.sync(0o640)


def test_sync_writes_what_is_held_sets_the_mode_and_fsyncs_the_writers_descriptor(tmp_path, monkeypatch):
    path = tmp_path / "a.dcm"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    writer = SpoolWriter(fd)
    writer.write(b"held")
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append((fd, path.read_bytes())) or real_fsync(fd))
    writer.sync(0o640)
    assert fsynced == [(fd, b"held")]
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    writer.close()


class _Request:
    AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    AffectedSOPInstanceUID = "1.2.3.4"

    def __init__(self, path, handle) -> None:
        self._dataset_path, self._dataset_file = path, handle


class _Recording:
    """An ingestor that only records what it was given."""

    def ingest_file(self, path, *requested, **given):
        self.given = given
        return "stored"


def test_a_spool_file_is_read_back_only_when_small_and_open_and_none_when_it_cannot_be_read(tmp_path):
    from dicom_node import frontdoor

    handle = frontdoor._SpoolHandle.create(tmp_path)
    handle.write(b"\0" * 128 + b"DICM" + b"x" * 5000)
    assert frontdoor._read_back(handle, 10_000) == b"\0" * 128 + b"DICM" + b"x" * 5000
    assert frontdoor._read_back(handle, 5000) is None  # over the limit: read from its path
    os.truncate(handle.name, 10)  # cut short behind its back: the path read names what is wrong
    assert frontdoor._read_back(handle, 10_000) is None
    handle.close()
    assert frontdoor._read_back(handle, 10_000) is None


def test_the_ingest_of_a_file_streamed_by_someone_else_gets_neither_fsync_nor_bytes(tmp_path):
    from dicom_node import frontdoor

    ingestor = _Recording()
    event = type("Event", (), {"request": _Request(tmp_path / "x.dcm", object())})()
    assert frontdoor.ingest_received(ingestor, event) == "stored"
    assert ingestor.given == {}  # not a spool file of ours


def test_after_the_ingest_the_spool_file_is_closed_and_removed_before_pynetdicom_would(tmp_path):
    from dicom_node import frontdoor

    handle = frontdoor._SpoolHandle.create(tmp_path)
    handle.write(b"\0" * 128 + b"DICM")
    request = _Request(handle.path, handle)
    ingestor = _Recording()
    assert frontdoor.ingest_received(ingestor, type("Event", (), {"request": request})()) == "stored"
    assert ingestor.given["contents"] == b"\0" * 128 + b"DICM"  # read back before it went
    assert handle.closed and not handle.path.exists()
    assert request._dataset_file is None  # nothing left for pynetdicom to close or unlink


def test_a_spool_file_that_cannot_be_removed_is_left_to_pynetdicom(tmp_path, monkeypatch):
    from dicom_node import frontdoor, gil_held

    handle = frontdoor._SpoolHandle.create(tmp_path)
    request = _Request(handle.path, handle)

    def refuse(path, size=0):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(gil_held, "unlink", refuse)
    frontdoor.ingest_received(_Recording(), type("Event", (), {"request": request})())
    assert handle.closed and handle.path.exists()
    assert request._dataset_file is handle  # pynetdicom tries again; the connection's end after it
