"""Durable instance store: <root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm.

A file is written under <root>/.incoming, fsynced, then hard-linked into place (which
fails instead of overwriting), and the directory entry is fsynced. A crash therefore
leaves either the complete file or nothing at its final path; leftovers in .incoming
are removed at start-up, those of processes that are gone only (incoming_owner.py).
"""

from __future__ import annotations

import enum
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import gil_held, incoming_owner


INCOMING = ".incoming"
CONFLICTS = ".conflicts"
FILE_MODE = 0o640
MAX_KNOWN_DIRS = 4096  # series folders remembered as existing (forgotten all at once beyond)
# Free space is read at most this often while it is well above the threshold (a statfs per
# instance is measurable under load); within FREE_SPACE_MARGIN of it, before every instance.
FREE_SPACE_RECHECK_SECONDS = 1.0
FREE_SPACE_MARGIN = 1 << 30


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE_IDENTICAL = "duplicate_identical"  # same bytes already stored: acknowledged, not stored twice
    CONFLICT_KEPT_FIRST = "conflict_kept_first"  # different bytes: first kept, new copy in .conflicts
    CONFLICT_REPLACED = "conflict_replaced"  # different bytes: replaced, old copy in .conflicts
    CONFLICT_REJECTED = "conflict_rejected"  # different bytes: refused, nothing written


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    path: Path
    conflict_copy: Path | None = None


class DiskFull(OSError):
    pass


class InstanceStore:
    def __init__(self, root: Path, min_free_bytes: int = 0, duplicate_policy: str = "keep_first") -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.duplicate_policy = duplicate_policy
        self.incoming = self.root / INCOMING
        self.conflicts = self.root / CONFLICTS
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.conflicts.mkdir(parents=True, exist_ok=True)
        self._incoming_resolved = self.incoming.resolve()
        self._free_read_at = float("-inf")
        self._free = 0
        self._known_dirs: set[Path] = set()  # folders seen or made here: no stat per instance

    def remove_partial_writes(self) -> int:
        """Delete the files processes that are gone (a crash, a kill) left in .incoming; none of
        them was ever acknowledged. What live processes are writing there stays."""
        return incoming_owner.remove_leftovers(self.incoming)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        # UIDs are validated by the caller (uids.check_uid): digits and dots only.
        return Path(f"{self.root}/{study_uid}/{series_uid}/{sop_uid}.dcm")  # one parse, where / parses each part

    def free_bytes(self) -> int:
        """Free space on the store's disk: read again after FREE_SPACE_RECHECK_SECONDS, or at
        once when the last reading was within FREE_SPACE_MARGIN of min_free_bytes: only a disk
        written faster than 1 GiB/s could pass the threshold between two readings, and then by
        at most a second's writing."""
        now = time.monotonic()
        if now - self._free_read_at >= FREE_SPACE_RECHECK_SECONDS or self._free - self.min_free_bytes < FREE_SPACE_MARGIN:
            self._free = shutil.disk_usage(self.root).free
            self._free_read_at = now
        return self._free

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoreResult:
        if self.free_bytes() - len(data) < self.min_free_bytes:
            raise DiskFull(
                f"free space on {self.root} below the threshold of {self.min_free_bytes // 2**20} MiB"
            )
        final = self.path_for(study_uid, series_uid, sop_uid)
        self._ensure_dir(final.parent)
        temp = self._write_synced(data)
        try:
            try:
                self._link_into(temp, final)  # atomic, and never overwrites
            except FileExistsError:
                if _same_content(final, temp):
                    return StoreResult(StoreOutcome.DUPLICATE_IDENTICAL, final)
                return self._resolve_conflict(final, temp)
            fsync_dir(final.parent)
            return StoreResult(StoreOutcome.STORED, final)
        finally:
            temp.unlink(missing_ok=True)

    def in_incoming(self, path: Path) -> bool:
        """Whether `path` is a spool file in this store's .incoming (adopted by a hard link)."""
        parent = Path(path).parent
        return parent == self.incoming or parent.resolve() == self._incoming_resolved

    def store_file(self, study_uid: str, series_uid: str, sop_uid: str, source: Path, sync_dir: bool = True,
                   make_durable: Callable[[], None] | None = None) -> StoreResult:
        """store() for an instance already in a file (a C-STORE the SCP streamed to .incoming):
        fsynced and hard-linked into place without being read into memory (copied first only
        from another folder). `source` itself is left for its owner to remove. With
        `sync_dir` False the new entry's folder is not fsynced here: the caller does it (a
        commit group fsyncs each folder once for several instances) before it answers.
        `make_durable`: makes `source` (in .incoming) durable as it is, with FILE_MODE (the front
        door's spool writer, on the descriptor it holds): called instead of an fsync of a link."""
        source = source if isinstance(source, Path) else Path(source)
        if self.free_bytes() < self.min_free_bytes:  # its bytes are on this disk already
            raise DiskFull(
                f"free space on {self.root} below the threshold of {self.min_free_bytes // 2**20} MiB"
            )
        final = self.path_for(study_uid, series_uid, sop_uid)
        self._ensure_dir(final.parent)
        if make_durable is not None:
            make_durable()  # the spool file itself is durable now: linked into place as it is
            temp, durable = None, source
        else:
            temp = durable = self._adopt(source)
        try:
            try:
                self._link_into(durable, final)
            except FileExistsError:
                if _same_content(final, durable):
                    return StoreResult(StoreOutcome.DUPLICATE_IDENTICAL, final)
                if temp is None:  # "replace" moves it into place: a link of our own, not the owner's file
                    temp = self._link_part(source)
                return self._resolve_conflict(final, temp)  # compared and kept from disk, never read whole
            if sync_dir:
                fsync_dir(final.parent)
            return StoreResult(StoreOutcome.STORED, final)
        finally:
            if temp is not None:
                temp.unlink(missing_ok=True)

    def _link_part(self, source: Path) -> Path:
        temp = incoming_owner.new_path(self.incoming, ".part")
        os.link(source, temp)
        return temp

    def _adopt(self, source: Path) -> Path:
        """A fsynced file in .incoming with `source`'s content: a link to it, or a copy."""
        if self.in_incoming(source):
            temp = self._link_part(source)
        else:
            temp = incoming_owner.new_path(self.incoming, ".part")
            with open(source, "rb") as src, open(temp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fchmod(fd, FILE_MODE)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def _resolve_conflict(self, final: Path, temp: Path) -> StoreResult:
        """`temp` (fsynced) has the SOP Instance UID of `final` and different content."""
        if self.duplicate_policy == "reject":
            return StoreResult(StoreOutcome.CONFLICT_REJECTED, final)
        if self.duplicate_policy == "replace":
            # Keep the old copy before the new one takes its place: nothing is lost.
            conflict_copy = self._keep_conflict(final, final.stem)
            os.replace(temp, final)
            outcome = StoreOutcome.CONFLICT_REPLACED
        else:
            conflict_copy = self._keep_conflict(temp, final.stem)
            outcome = StoreOutcome.CONFLICT_KEPT_FIRST
        fsync_dir(self.conflicts)
        fsync_dir(final.parent)
        return StoreResult(outcome, final, conflict_copy)

    def _keep_conflict(self, source: Path, sop_uid: str) -> Path:
        """Hard-link `source` into .conflicts as <SOPInstanceUID>.<sha256 of its bytes>.dcm.

        Named by content, so each conflicting version is kept once however often it is resent."""
        conflict_copy = self.conflicts / f"{sop_uid}.{_sha256(source)}.dcm"
        try:
            os.link(source, conflict_copy)
        except FileExistsError:
            pass  # this exact version is already kept
        return conflict_copy

    def _write_synced(self, data: bytes) -> Path:
        temp = incoming_owner.new_path(self.incoming, ".part")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return temp

    def _link_into(self, source: Path, final: Path) -> None:
        try:
            gil_held.link(source, final)
        except FileNotFoundError:  # its folder was removed since it was made (another process)
            self._known_dirs.discard(final.parent)
            self._ensure_dir(final.parent)
            gil_held.link(source, final)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        if len(self._known_dirs) >= MAX_KNOWN_DIRS:
            self._known_dirs.clear()
        self._make_dirs(directory)
        self._known_dirs.add(directory)

    def _make_dirs(self, directory: Path) -> None:
        if directory.is_dir():
            return
        # Create each missing level and fsync its parent, so the new entries survive a crash.
        missing = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                pass  # another association made it meanwhile: its entry may not be durable yet
            fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a folder's entries (a file linked into it) survive a crash."""
    fd = gil_held.open_file(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        gil_held.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _same_content(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(chunk)
            if block != fb.read(chunk):
                return False
            if not block:
                return True
