"""System calls of microseconds, made without releasing the GIL: the front door's file-system
calls where the store is local, and the non-blocking receive and send of a plain socket.

CPython releases the GIL around every system call. With several associations busy, each
release is a hand-off: another thread takes the GIL, and this one, back a few microseconds
later, waits for it again (a futex wait and two context switches, more CPU than the call).
Per received instance the front door makes a dozen such calls that only touch a local file
system's metadata in memory: open and close of its spool file and of a folder to fsync, fchmod,
link, unlink, flock; and two on its socket: the recv of what has arrived, the send of a
response. Here they go through ``ctypes.PyDLL``, which keeps the GIL. The calls that wait
(fsync, a flock that another process holds, a wait for the socket, a send into a full socket
buffer) still release it.

The file-system calls only after ``use_for(path)`` found `path` on a local file system
(mountinfo: ext4, xfs, btrfs, tmpfs and the like): on NFS or CIFS a metadata call can take
seconds, and there everything goes to ``os`` as before. On a journaling file system a
metadata call can also wait briefly for the journal commit under way; on a journaled ext4,
four associations with the commit group's fsyncs came out the same with and without these
calls held (six alternated pairs), on the test machine's ext4 without a journal 7-15 % less
CPU per instance. The last link of a file over SMALL_UNLINK is removed with the GIL released
(its blocks are freed in the call). The socket calls never wait
(MSG_DONTWAIT). Both need glibc. Errors are raised as ``os`` and ``socket`` raise them
(``OSError`` of the errno, so ``FileExistsError``, ``BlockingIOError``...).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import socket
from pathlib import Path

from .logs import log_event

log = logging.getLogger(__name__)

SMALL_UNLINK = 1 << 20  # bytes of a file whose last link may go with the GIL held
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay"})


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.PyDLL("libc.so.6", use_errno=True)  # PyDLL: the GIL stays held during calls
    except OSError:
        return None
    libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]
    libc.link.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.unlink.argtypes = [ctypes.c_char_p]
    libc.recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    for name in ("open", "close", "fchmod", "link", "unlink", "flock"):
        getattr(libc, name).restype = ctypes.c_int
    libc.recv.restype = libc.send.restype = ctypes.c_ssize_t
    return libc


_LIBC = _load_libc()  # the socket calls; None: without glibc, socket's own calls
_libc: ctypes.CDLL | None = None  # the file-system calls, once use_for found the store local

MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")  # mountinfo writes space, tab, newline, backslash so


def file_system_of(path: Path, mountinfo: Path = MOUNTINFO) -> str:
    """The type of the file system `path` is on (its longest mount point in mountinfo, the last
    such line for a mount over another); "" unknown. Compared as bytes, escapes decoded."""
    target = os.fsencode(os.path.realpath(path))
    best, fs_type = b"", ""
    try:
        with open(mountinfo, "rb") as mounts:
            for line in mounts:
                fields = line.split()
                try:
                    mount_point = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
                    fs = fields[fields.index(b"-") + 1].decode("ascii", "replace")
                except (IndexError, ValueError):
                    continue
                inside = target == mount_point or target.startswith(mount_point.rstrip(b"/") + b"/")
                if inside and len(mount_point) >= len(best):
                    best, fs_type = mount_point, fs
    except OSError:
        return ""
    return fs_type


def use_for(*paths: Path, mountinfo: Path = MOUNTINFO) -> bool:
    """Make the calls below keep the GIL if all `paths` (the store, the index's folder) are on
    local file systems; otherwise, or without glibc, they release it as ``os`` does."""
    global _libc
    types = {str(path): file_system_of(path, mountinfo) or "unknown" for path in paths}
    _libc = _LIBC if all(fs in LOCAL_FILE_SYSTEMS for fs in types.values()) else None
    log_event(log, logging.INFO, "gil_held.used" if _libc is not None else "gil_held.not_used", file_systems=types)
    return _libc is not None


def stop_using() -> None:
    global _libc
    _libc = None


def in_use() -> bool:
    return _libc is not None


def _error(*paths) -> OSError:
    """The error of the call just made, as ``os`` would raise it (the errno's subclass)."""
    code = ctypes.get_errno()
    if len(paths) == 2:
        return OSError(code, os.strerror(code), str(paths[0]), None, str(paths[1]))
    if paths:
        return OSError(code, os.strerror(code), str(paths[0]))
    return OSError(code, os.strerror(code))


def _retried(function, *args) -> int:
    """`function(*args)`, made again after EINTR as ``os`` makes its calls again (PEP 475)."""
    while True:
        result = function(*args)
        if result >= 0 or ctypes.get_errno() != errno.EINTR:
            return result


def open_file(path, flags: int, mode: int = 0o777) -> int:
    """``os.open``; the descriptor is close-on-exec, as os.open makes it."""
    if _libc is None:
        return os.open(path, flags, mode)
    fd = _retried(_libc.open, os.fsencode(path), flags | os.O_CLOEXEC, mode)
    if fd < 0:
        raise _error(path)
    return fd


def close(fd: int) -> None:
    if _libc is None:
        return os.close(fd)
    if _libc.close(fd) < 0:  # never made again: Linux has closed it even after EINTR
        raise _error()


def fchmod(fd: int, mode: int) -> None:
    if _libc is None:
        return os.fchmod(fd, mode)
    if _retried(_libc.fchmod, fd, mode) < 0:
        raise _error()


def link(source, target) -> None:
    """``os.link`` (a hard link; `source` is not a symbolic link here)."""
    if _libc is None:
        return os.link(source, target)
    if _retried(_libc.link, os.fsencode(source), os.fsencode(target)) < 0:
        raise _error(source, target)


def unlink(path, size: int = 0) -> None:
    """``os.unlink``. `size`: the file's, where this may be its last link: the blocks of one
    over SMALL_UNLINK are freed by the call itself, which then releases the GIL."""
    if _libc is None or size > SMALL_UNLINK:
        return os.unlink(path)
    if _retried(_libc.unlink, os.fsencode(path)) < 0:
        raise _error(path)


def lock_exclusive(fd: int) -> None:
    """``fcntl.flock(fd, LOCK_EX)``: tried without waiting first; a lock another process holds
    is waited for with the GIL released."""
    if _libc is not None:
        if _libc.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) == 0:
            return
        if ctypes.get_errno() not in (errno.EWOULDBLOCK, errno.EINTR):  # held elsewhere: wait below
            raise _error()
    fcntl.flock(fd, fcntl.LOCK_EX)


def unlock(fd: int) -> None:
    if _libc is None:
        return fcntl.flock(fd, fcntl.LOCK_UN)
    if _libc.flock(fd, fcntl.LOCK_UN) < 0:
        raise _error()


def recv_into(sock, view: memoryview) -> int:
    """``sock.recv_into(view, 0, MSG_DONTWAIT)`` on a plain socket: what has arrived, up to
    ``len(view)``; BlockingIOError when nothing has."""
    if _LIBC is None or not len(view):
        return sock.recv_into(view, 0, socket.MSG_DONTWAIT)
    start = ctypes.c_char.from_buffer(view)  # its first byte: no array type made per length
    try:
        got = _LIBC.recv(sock.fileno(), ctypes.addressof(start), len(view), socket.MSG_DONTWAIT)
    finally:
        del start  # the view's export ends here (its bytearray may grow later)
    if got < 0:
        raise _error()
    return got


def send_now(sock, data: bytes) -> int:
    """As much of `data` as a plain socket takes without waiting (MSG_DONTWAIT): how many bytes;
    0 where it would wait, had an error, or the calls are not available. The caller sends the
    rest (and meets any error) with the socket's own send, which waits with the GIL released."""
    if _LIBC is None:
        return 0
    sent = _LIBC.send(sock.fileno(), data, len(data), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    return max(sent, 0)
