"""Whose is each file in a store's .incoming, so that only the leftovers of processes that are
gone are removed.

Several processes write into one .incoming: the SCP processes of `serve`, and the io workers
(prior retrieval, report delivery), maybe in other pods on the same volume. Removing everything
at a start of `serve` took files other processes were writing. So each process names its files
after a token of its own, and holds an flock on ``<token>.owner`` in the folder for as long as
it lives. The kernel drops a process's locks when it ends, kill -9 and OOM kill included, so a
file is a leftover exactly when its owner's lock can be taken (or it has no owner file).

The owner file only ever exists locked: it is created and locked under a temporary name, then
renamed into place.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path

from .logs import log_event

log = logging.getLogger(__name__)

OWNER_SUFFIX = ".owner"
CLAIMING_SUFFIX = ".claiming"  # an owner file being created: renamed within microseconds
CLAIMING_GRACE_SECONDS = 60.0
UNOWNED_GRACE_SECONDS = 3600.0  # a file named without a token: an older version's, maybe still writing
_OWNED_NAME = re.compile(r"^([0-9a-f]{16})-")

_tokens: dict[str, str] = {}  # folder -> this process's token there (a forked child starts empty)
_lock_fds: list[int] = []  # held open for the life of the process: that is the lock
_tokens_lock = threading.Lock()
_serial = itertools.count()  # next() is atomic under the GIL: no lock, no random bytes (a system call) per file


def new_path(incoming: Path, suffix: str) -> Path:
    """A fresh file name in `incoming` that this process owns: its token there (this process's
    alone; a forked child takes a new one), then a number counted in this process."""
    return Path(f"{incoming}/{_token(incoming)}-{next(_serial)}{suffix}")  # one parse, where / parses again


def _token(incoming: Path) -> str:
    key = str(incoming)
    with _tokens_lock:
        token = _tokens.get(key)
        if token is None:
            incoming = Path(incoming)
            token = uuid.uuid4().hex[:16]
            claiming = incoming / f".{token}{CLAIMING_SUFFIX}"
            fd = os.open(claiming, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # a filesystem without locks: cleaners cannot lock it either
                log_event(log, logging.WARNING, "incoming.owner_lock_unavailable", folder=str(incoming), error=str(exc))
            os.rename(claiming, incoming / f"{token}{OWNER_SUFFIX}")
            _lock_fds.append(fd)
            _tokens[key] = token
        return token


def remove_leftovers(incoming: Path) -> int:
    """Delete the files in `incoming` whose owning process is gone; return how many. Files of
    live processes (this one included) are left alone."""
    incoming = Path(incoming)
    checked: dict[str, bool] = {}  # token -> its owner is gone
    held: list[int] = []  # locks taken on dead owners' files, released at the end
    removed = 0
    try:
        for path in list(incoming.iterdir()):
            name = path.name
            if name.endswith(OWNER_SUFFIX):
                continue  # removed with its files, below
            if name.endswith(CLAIMING_SUFFIX):
                if _older_than(path, CLAIMING_GRACE_SECONDS) and _owner_gone(path, held):
                    removed += _unlink(path)
                continue
            match = _OWNED_NAME.match(name)
            if match:
                token = match.group(1)
                if token not in checked:
                    checked[token] = _owner_gone(incoming / f"{token}{OWNER_SUFFIX}", held)
                if not checked[token]:
                    continue
            elif not _older_than(path, UNOWNED_GRACE_SECONDS):
                continue  # during a rolling upgrade an older pod may be writing it
            removed += _unlink(path)
        for path in list(incoming.glob(f"*{OWNER_SUFFIX}")):
            token = path.name[: -len(OWNER_SUFFIX)]
            if checked.get(token, False) or (token not in checked and _owner_gone(path, held)):
                _unlink(path)
    finally:
        for fd in held:
            os.close(fd)
    if removed:
        log_event(log, logging.WARNING, "store.partial_writes_removed", folder=str(incoming), count=removed)
    return removed


def _owner_gone(owner_file: Path, held: list[int]) -> bool:
    """Whether nobody holds `owner_file`'s lock (or it is not there); the lock taken is kept in
    `held`, so that no process can take the same owner file meanwhile."""
    try:
        fd = os.open(owner_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:  # unreadable: whoever owns it, leave it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (BlockingIOError), or a filesystem without locks: leave it
        os.close(fd)
        return False
    held.append(fd)
    return True


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _unlink(path: Path) -> int:
    """1 if `path` was removed; what cannot be removed (a folder, no permission, an NFS
    silly-rename file still open) is logged and left, and the clean-up goes on."""
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log_event(log, logging.WARNING, "incoming.leftover_not_removed", path=str(path), error=str(exc))
        return 0


def _after_fork_in_child() -> None:
    """A forked child (a Celery pool process) takes tokens of its own. It drops its copies of the
    parent's lock descriptors (closing a copy leaves the parent's lock held), so the parent's
    leftovers are not taken for in use once the parent is gone."""
    global _tokens_lock
    _tokens_lock = threading.Lock()  # another thread may have held it at the fork
    for fd in _lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _lock_fds.clear()
    _tokens.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
