"""Instance rows a power loss took back, put back from the store when the SCP starts.

The SCP answers a C-STORE once the file and its folder entry are fsynced and the index row is
committed; with `index_instance_commit: fast` (the default) that commit does not wait for the
disk (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit off), which saves a flush per
instance. A crash of the process (kill -9) loses no committed row: the write is in the
operating system's cache. A power loss or kernel crash may take back the last rows. So the
first SCP process marks the store while it runs; when it finds the mark of a run that did not
stop cleanly, it walks the series folders changed since the newest row that survived (less a
margin: a row is committed a moment after its file is linked) and indexes every instance file
that has no row, before it listens. Nothing here runs after a clean stop.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .ingest import Ingestor
from .logs import log_event

log = logging.getLogger(__name__)

RUNNING_MARK = ".running"  # in the store's root while a first SCP process runs on it
MARGIN_SECONDS = 600.0  # series folders changed up to this long before the newest row are walked too


def begin_run(store_root: Path) -> bool:
    """Mark the store as in use; True if the previous run did not stop cleanly."""
    mark = Path(store_root) / RUNNING_MARK
    unclean = mark.exists()
    mark.touch()
    return unclean


def end_run(store_root: Path) -> None:
    (Path(store_root) / RUNNING_MARK).unlink(missing_ok=True)


def restore_missing_rows(ingestor: Ingestor) -> int:
    """Index the stored instances without a row in recently changed series folders; how many."""
    started = time.monotonic()
    newest = ingestor.index.newest_instance_received_at()
    since = None if newest is None else newest - MARGIN_SECONDS
    restored = failed = walked = 0
    for series in _series_folders(ingestor.store.root):
        if since is not None and series.stat().st_mtime < since:
            continue
        walked += 1
        for path in series.glob("*.dcm"):
            if ingestor.index.instance_exists(path.stem):
                continue
            result = ingestor.ingest_file(path)
            if result.ok:
                restored += 1
            else:
                failed += 1
                log_event(log, logging.WARNING, "recovery.instance_not_indexed", path=str(path), reason=result.message)
    log_event(log, logging.WARNING if restored or failed else logging.INFO, "recovery.after_unclean_stop",
              series_folders_walked=walked, rows_restored=restored, failed=failed,
              seconds=round(time.monotonic() - started, 2))
    return restored


def _series_folders(root: Path):
    for study in sorted(root.iterdir()):
        if study.name.startswith(".") or not study.is_dir():
            continue  # .incoming, .conflicts, the mark
        for series in sorted(study.iterdir()):
            if series.is_dir():
                yield series
