"""Group commit: instances received on several associations at once share their flushes.

After an instance's file is fsynced and hard-linked into place, two flushes remain before its
C-STORE may succeed: the directory entry (fsync of the series folder) and the index row (the
SQLite WAL commit). Each is a journal commit of several milliseconds, and on one disk they
queue behind each other. Here the association threads that reach that point together form
one group: the first to arrive while no group is being written becomes the leader, fsyncs
each folder of its group once, writes all rows in one transaction, and wakes the group's
other threads; those that arrived meanwhile form the next group, led by the first of them,
whom the leader wakes too. Each thread waits on a lock of its own, so nobody is woken only to
find nothing done for them yet. With one
association a group is that one instance (nothing waits, no thread hand-off); with N busy
associations up to N instances share two flushes. Nobody is answered before their own folder
and row are durable, so the crash guarantees are those of one instance at a time.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .index import Index, InstanceRecord
from .storage import fsync_dir

log = logging.getLogger(__name__)

MAX_GROUP = 64  # instances per transaction: a bound on one leader's work


@dataclass
class _Pending:
    record: InstanceRecord
    directory: Path | None  # the folder its file was linked into (None: already durable)
    done: bool = False
    written: bool = False  # its row is committed (set only by the group that wrote it)
    inserted: bool = False
    error: BaseException | None = field(default=None, repr=False)
    # Held until this instance is done, or made the next leader (``leads``): its thread waits
    # on it alone, so a finished group wakes only its own members and one successor.
    wake: threading.Lock = field(default_factory=threading.Lock, repr=False)
    leads: bool = False


class CommitGroup:
    def __init__(self, index: Index) -> None:
        self.index = index
        self._lock = threading.Lock()
        self._waiting: list[_Pending] = []
        self._writing = False  # a leader is flushing a group now
        self.groups = 0  # statistics for the benchmark: groups written, instances in them
        self.instances = 0

    def commit(self, record: InstanceRecord, directory: Path | None) -> bool:
        """Make `directory`'s entries and `record`'s row durable; True if the row was new."""
        pending = _Pending(record, directory)
        pending.wake.acquire()
        with self._lock:
            if self._writing:
                self._waiting.append(pending)
                group = None
            else:
                self._writing = True
                group = [pending]
        if group is None:
            pending.wake.acquire()  # released by the leader that wrote it, or made it the next one
            if not pending.leads:
                return _outcome(pending)
            with self._lock:  # those that came while it woke up join its group too
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
        try:
            self._write(group)
        finally:
            self._finish(group)
        return _outcome(pending)

    def _finish(self, group: list[_Pending]) -> None:
        """Mark `group` done and wake its members; the first of those that came meanwhile leads
        the next group (up to MAX_GROUP of those waiting when it runs), or nobody is writing."""
        for item in group:
            if not item.written and item.error is None:  # the leader failed half-way
                item.error = RuntimeError("the commit group was not written")
            item.done = True
        with self._lock:
            successor = None
            if self._waiting:  # still writing: nobody else becomes leader meanwhile
                successor = self._waiting[0]
                successor.leads = True
            else:
                self._writing = False
        if successor is not None:
            successor.wake.release()  # first: its flushes wait on the disk, not on the GIL
        for item in group[1:]:
            item.wake.release()

    def _write(self, group: list[_Pending]) -> None:
        self.groups += 1
        self.instances += len(group)
        failed_dirs: dict[Path, BaseException] = {}
        for directory in {item.directory for item in group if item.directory is not None}:
            try:
                fsync_dir(directory)
            except OSError as exc:
                failed_dirs[directory] = exc
        ready = []
        for item in group:
            if item.directory in failed_dirs:
                item.error = failed_dirs[item.directory]
            else:
                ready.append(item)
        if not ready:
            return
        try:
            for item, inserted in zip(ready, self.index.record_instances([item.record for item in ready])):
                item.inserted, item.written = inserted, True
        except Exception as exc:
            if len(ready) == 1:
                ready[0].error = exc
                return
            # One bad row must fail only its own instance: write them one by one.
            log.warning("commit_group.group_failed_retrying_singly", exc_info=True)
            for item in ready:
                try:
                    item.inserted, item.written = self.index.record_instance(item.record), True
                except Exception as exc:
                    item.error = exc


def _outcome(pending: _Pending) -> bool:
    if pending.error is not None:
        raise pending.error
    return pending.inserted
