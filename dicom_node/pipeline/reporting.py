"""The durable delivery outbox of reports, and one delivery pass for a job's SR."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import Settings
from ..index import Index
from ..report.delivery import DONE, DeliveryQueue
from .runtime import Runtime


def delivery_queue(rt: Runtime) -> DeliveryQueue:
    return queue_for(rt.settings, rt.index)


def queue_for(settings: Settings, index: Index) -> DeliveryQueue:
    """The durable delivery outbox: SR files under work_dir/outbox, rows in the index."""
    return DeliveryQueue(index, Path(settings.work_dir) / "outbox", settings.report, settings.ae_title)


def deliver_pending(rt: Runtime, sop_uids: list[str]) -> tuple[bool, str, float]:
    """Try the due deliveries of one job's objects (its SR, and overlay SC if any); returns (all accepted
    everywhere, last error, seconds until the next try)."""
    queue = delivery_queue(rt)
    queue.deliver_due(only=sop_uids)
    rows = [row for row in queue.rows() if row.sop_instance_uid in sop_uids]
    waiting = [row for row in rows if row.status not in DONE]
    if not waiting:
        return True, "", 0.0
    next_try = max(0.5, min(row.next_attempt_at for row in waiting) - time.time())
    return False, "; ".join(f"{row.destination}: {row.last_error}" for row in waiting if row.last_error), next_try
