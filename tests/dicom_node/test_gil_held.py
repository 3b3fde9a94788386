"""gil_held: the file-system calls keep the GIL only where the store is local, fail as os fails,
and a lock held elsewhere is waited for with the GIL released."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import threading

import pytest

from dicom_node import gil_held

MOUNTS = """\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
30 22 0:40 / /data rw - nfs4 server:/export rw
31 30 8:2 / /data/local\\040disk rw - xfs /dev/sdb1 rw
32 22 0:41 / /dat rw - tmpfs tmpfs rw
33 22 0:42 / /mnt/back\\134slash rw - cifs //server/share rw
34 22 0:43 / /mnt/over rw - ext4 /dev/sdc1 rw
35 34 0:44 / /mnt/over rw - nfs server:/over rw
"""


@pytest.fixture
def mountinfo(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTS)
    return path


@pytest.fixture
def local(tmp_path):
    assert gil_held.use_for(tmp_path), f"the test folder is on {gil_held.file_system_of(tmp_path)}"
    yield
    gil_held.stop_using()


def test_the_longest_mount_point_containing_a_path_names_its_file_system(mountinfo):
    assert gil_held.file_system_of("/srv/store", mountinfo) == "ext4"
    assert gil_held.file_system_of("/data/store", mountinfo) == "nfs4"
    assert gil_held.file_system_of("/data/local disk/store", mountinfo) == "xfs"  # \040 is a space
    assert gil_held.file_system_of("/database", mountinfo) == "ext4"  # not under /data, nor /dat
    assert gil_held.file_system_of("/dat/x", mountinfo) == "tmpfs"
    assert gil_held.file_system_of("/mnt/back\\slash/store", mountinfo) == "cifs"  # \134 is a backslash
    assert gil_held.file_system_of("/mnt/over/store", mountinfo) == "nfs"  # mounted over the ext4
    assert gil_held.file_system_of("/x", mountinfo.with_name("missing")) == ""


def test_used_only_when_every_path_is_local(mountinfo, monkeypatch):
    try:
        assert gil_held.use_for("/srv/store", "/data/local disk/index", mountinfo=mountinfo)
        assert gil_held.in_use()
        assert not gil_held.use_for("/srv/store", "/data/index", mountinfo=mountinfo)  # the index on NFS
        assert not gil_held.in_use()
        calls = []
        monkeypatch.setattr(gil_held.os, "link", lambda *args: calls.append(args))
        gil_held.link("a", "b")  # not in use: os's own call, which releases the GIL
        assert calls == [("a", "b")]
    finally:
        gil_held.stop_using()


def test_in_use_the_calls_keep_the_gil(local):
    for name in ("open", "close", "fchmod", "link", "unlink", "flock", "recv", "send"):
        assert getattr(gil_held._libc, name)._flags_ & ctypes._FUNCFLAG_PYTHONAPI, name


def test_in_use_the_calls_do_what_os_does_and_fail_as_os_fails(local, tmp_path):
    path = tmp_path / "a.dcm"
    fd = gil_held.open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    assert not os.get_inheritable(fd)  # close-on-exec, as os.open makes it
    gil_held.fchmod(fd, 0o640)
    assert os.stat(path).st_mode & 0o777 == 0o640
    gil_held.close(fd)
    with pytest.raises(FileExistsError) as exists:
        gil_held.open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    assert exists.value.filename == str(path)
    gil_held.link(path, tmp_path / "b.dcm")
    assert os.stat(path).st_nlink == 2
    with pytest.raises(FileExistsError) as linked:
        gil_held.link(path, tmp_path / "b.dcm")
    assert (linked.value.filename, linked.value.filename2) == (str(path), str(tmp_path / "b.dcm"))
    with pytest.raises(FileNotFoundError):
        gil_held.link(tmp_path / "missing", tmp_path / "c.dcm")
    gil_held.unlink(tmp_path / "b.dcm")
    with pytest.raises(FileNotFoundError):
        gil_held.unlink(tmp_path / "b.dcm")
    with pytest.raises(OSError) as closed:
        gil_held.close(fd)  # closed already
    assert closed.value.errno == 9
    with pytest.raises(NotADirectoryError):
        gil_held.open_file(path, os.O_RDONLY | os.O_DIRECTORY)


def test_a_lock_held_elsewhere_is_waited_for_with_the_gil_released(local, tmp_path, monkeypatch):
    waits = []
    real_flock = fcntl.flock
    monkeypatch.setattr(gil_held.fcntl, "flock", lambda fd, op: waits.append(op) or real_flock(fd, op))
    path = tmp_path / "index.db.write-lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    waiter = os.open(path, os.O_RDWR)  # its own open file: flock excludes it as another process
    real_flock(holder, fcntl.LOCK_EX)
    got = threading.Event()

    def take() -> None:
        gil_held.lock_exclusive(waiter)
        got.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    # This thread runs Python meanwhile (it could not, were the waiter holding the GIL).
    assert not got.wait(0.3)
    real_flock(holder, fcntl.LOCK_UN)
    assert got.wait(5)
    thread.join(5)
    assert waits == [fcntl.LOCK_EX]  # the blocking flock of the fcntl module, which releases the GIL
    gil_held.unlock(waiter)
    gil_held.lock_exclusive(waiter)  # free: taken at once, without the fcntl module
    gil_held.unlock(waiter)
    assert waits == [fcntl.LOCK_EX]
    real_flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    os.close(holder)
    os.close(waiter)


def test_a_socket_is_read_without_waiting_and_sent_to_as_far_as_it_takes_without_waiting():
    ours, peer = socket.socketpair()
    try:
        inbox = bytearray(10)
        with pytest.raises(BlockingIOError):
            gil_held.recv_into(ours, memoryview(inbox))  # nothing has arrived
        peer.sendall(b"abcdefghijkl")
        assert gil_held.recv_into(ours, memoryview(inbox)[2:]) == 8  # up to the room given
        assert inbox == b"\0\0abcdefgh"
        inbox.extend(b"grown")  # no export of the buffer outlives the call
        assert gil_held.send_now(ours, b"response") == 8 and peer.recv(100) == b"response"
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = [gil_held.send_now(ours, b"x" * 65536) for _ in range(64)]  # nobody reads: it fills
        assert sent[-1] == 0 and 0 < sum(sent) < 64 * 65536  # never waited for room
        peer.close()
        assert gil_held.send_now(ours, b"more") == 0  # an error: left to the socket's own send
        with pytest.raises(OSError):
            ours.send(b"more")
    finally:
        ours.close()
        peer.close()
    with pytest.raises(OSError):
        gil_held.recv_into(ours, memoryview(inbox))  # closed


def test_a_call_interrupted_by_a_signal_is_made_again_and_another_error_is_not():
    import errno

    calls = []

    def interrupted_once(*args):
        calls.append(args)
        if len(calls) == 1:
            ctypes.set_errno(errno.EINTR)
            return -1
        return 7

    assert gil_held._retried(interrupted_once, b"path", 1) == 7 and calls == [(b"path", 1)] * 2

    def refused(*args):
        calls.append(args)
        ctypes.set_errno(errno.EACCES)
        return -1

    calls.clear()
    assert gil_held._retried(refused, b"path") == -1 and len(calls) == 1


def test_a_big_files_last_link_is_removed_with_the_gil_released(local, tmp_path, monkeypatch):
    removed = []
    real_unlink = os.unlink
    monkeypatch.setattr(gil_held.os, "unlink", lambda path: removed.append(path) or real_unlink(path))
    small, big = tmp_path / "small.dcm", tmp_path / "big.dcm"
    small.write_bytes(b"x")
    big.write_bytes(b"x")
    gil_held.unlink(small, 33_000)
    gil_held.unlink(big, gil_held.SMALL_UNLINK + 1)  # its blocks freed in the call: not held
    assert removed == [big] and not small.exists() and not big.exists()
