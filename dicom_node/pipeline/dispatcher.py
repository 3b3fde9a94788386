"""Publishes completed studies (durable outbox rows written by the SCP) to the pipeline.

Runs beside the SCP. If the broker is down the SCP keeps receiving; rows stay pending
and are published when it is back. A row becomes a job keyed by its study, instance set
and model version, so the same input set is never processed twice.
"""

from __future__ import annotations

import logging

from ..config import Settings
from ..index import Index
from ..logs import log_event
from ..polling import PollingThread
from .jobs import JobStore
from .runtime import model_version

log = logging.getLogger(__name__)


def dispatch_pending(index: Index, jobs: JobStore, settings: Settings) -> int:
    from .tasks import publish

    published = 0
    version = model_version(settings)
    for row in index.outbox_rows(pending_only=True):
        study = index.study(row.study_uid) or {}
        priority = "urgent" if study.get("urgent") else "routine"
        job = jobs.create(row.study_uid, row.id, row.instance_set_hash, version, priority)
        try:
            if job.state == "queued":
                publish("priors", job.job_key, priority)
        except Exception as exc:  # broker down: keep the row, try again on the next pass
            index.record_publish_error(row.id, f"{type(exc).__name__}: {exc}")
            log_event(log, logging.WARNING, "dispatch.broker_unavailable", study_uid=row.study_uid, error=str(exc))
            break
        index.mark_published(row.id)
        published += 1
        log_event(log, logging.INFO, "dispatch.published", study_uid=row.study_uid, job=job.job_key, priority=priority, reason=row.reason)
    return published


class Dispatcher(PollingThread):
    def __init__(self, index: Index, settings: Settings) -> None:
        from .app import configure

        configure(settings)
        jobs = JobStore(index)
        super().__init__("outbox-dispatcher", settings.dispatch_poll_seconds, lambda: dispatch_pending(index, jobs, settings))
