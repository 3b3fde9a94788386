"""File-system calls of microseconds, made without releasing the GIL, where the store is local.

CPython releases the GIL around every system call. With several associations busy, each
release is a hand-off: another thread takes the GIL, and this one, back a few microseconds
later, waits for it again (a futex wait and two context switches, more CPU than the call).
Per received instance the front door makes a dozen such calls that only touch a local file
system's metadata in memory: open and close of its spool file and of a folder to fsync, fchmod,
link, unlink, flock. Here they go through ``ctypes.PyDLL``, which keeps the GIL. The calls that
wait (fsync, a flock that another process holds, anything on the network) still release it.

Only after ``use_for(path)`` found `path` on a local file system (mountinfo: ext4, xfs, btrfs,
tmpfs and the like), and only with glibc; on NFS or CIFS a metadata call can take seconds, and
everything goes to ``os`` as before. Errors are raised as ``os`` raises them (``OSError`` of the
errno, so ``FileExistsError``, ``FileNotFoundError``...).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from pathlib import Path

from .logs import log_event

log = logging.getLogger(__name__)

LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay"})

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.PyDLL("libc.so.6", use_errno=True)  # PyDLL: the GIL stays held during calls
    except OSError:
        return None
    libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]
    libc.link.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.unlink.argtypes = [ctypes.c_char_p]
    for name in ("open", "close", "fchmod", "link", "unlink", "flock"):
        getattr(libc, name).restype = ctypes.c_int
    return libc


MOUNTINFO = Path("/proc/self/mountinfo")


def file_system_of(path: Path, mountinfo: Path = MOUNTINFO) -> str:
    """The type of the file system `path` is on (its longest mount point in mountinfo); "" unknown."""
    target = os.path.realpath(path)
    best, fs_type = "", ""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                try:
                    mount_point = fields[4].replace("\\040", " ")
                    fs = fields[fields.index("-") + 1]
                except (IndexError, ValueError):
                    continue
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
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
    _libc = _load_libc() if all(fs in LOCAL_FILE_SYSTEMS for fs in types.values()) else None
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


def open_file(path, flags: int, mode: int = 0o777) -> int:
    """``os.open``; the descriptor is close-on-exec, as os.open makes it."""
    if _libc is None:
        return os.open(path, flags, mode)
    fd = _libc.open(os.fsencode(path), flags | os.O_CLOEXEC, mode)
    if fd < 0:
        raise _error(path)
    return fd


def close(fd: int) -> None:
    if _libc is None:
        return os.close(fd)
    if _libc.close(fd) < 0:
        raise _error()


def fchmod(fd: int, mode: int) -> None:
    if _libc is None:
        return os.fchmod(fd, mode)
    if _libc.fchmod(fd, mode) < 0:
        raise _error()


def link(source, target) -> None:
    """``os.link`` (a hard link; `source` is not a symbolic link here)."""
    if _libc is None:
        return os.link(source, target)
    if _libc.link(os.fsencode(source), os.fsencode(target)) < 0:
        raise _error(source, target)


def unlink(path) -> None:
    if _libc is None:
        return os.unlink(path)
    if _libc.unlink(os.fsencode(path)) < 0:
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
