"""The prior cache: retrieved priors live in the node's store; least recently used ones are evicted
when their total size exceeds the disk budget. A leased prior (in use by a comparison) and any
study that arrived as a current study are never evicted."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..index import Index
from ..logs import log_event

log = logging.getLogger(__name__)


@dataclass
class Eviction:
    evicted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    remaining_bytes: int = 0
    over_budget: bool = False  # still over budget: everything left is leased


def evict_priors(index: Index, budget_bytes: int, storage_dir: Path | None = None, now: float | None = None) -> Eviction:
    """Delete least recently used, unleased prior studies (rows first, then files) until under budget."""
    now = time.time() if now is None else now
    entries = index.prior_cache()
    total = sum(int(e["bytes"]) for e in entries)
    result = Eviction()
    for entry in entries:  # least recently used first
        if total <= budget_bytes:
            break
        if entry["in_use_until"] > now:
            continue
        paths = index.delete_prior_study(entry["study_uid"], now)
        if not paths and int(entry["bytes"]):
            continue  # leased or queued for analysis meanwhile
        # Rows are gone first: a crash here leaves orphan files, never rows pointing at nothing.
        for path in paths:
            _remove(Path(path), storage_dir)
        total -= int(entry["bytes"])
        result.freed_bytes += int(entry["bytes"])
        result.evicted.append(entry["study_uid"])
        log_event(log, logging.INFO, "priors.evicted", study_uid=entry["study_uid"], bytes=int(entry["bytes"]))
    result.remaining_bytes = total
    result.over_budget = total > budget_bytes
    if result.over_budget:
        log_event(log, logging.WARNING, "priors.cache_over_budget", bytes=total, budget=budget_bytes)
    return result


def _remove(path: Path, storage_dir: Path | None) -> None:
    path.unlink(missing_ok=True)
    # Drop the series and study folders once empty, never above the store root.
    for folder in (path.parent, path.parent.parent):
        if storage_dir is not None and folder.resolve() == Path(storage_dir).resolve():
            break
        try:
            os.rmdir(folder)
        except OSError:
            break  # not empty (or already gone)
