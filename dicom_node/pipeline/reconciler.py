"""The pipeline coordinator in `serve`: turns completed studies into jobs and guarantees progress.

One pass, on the one replica holding the "pipeline" lease (several SCP replicas share one
PostgreSQL; the lease is a row, taken by compare-and-set, so at most one coordinates at a time):
  1. dispatch: every completed study waiting in the outbox becomes a job (idempotent);
  2. reconcile: every active job with no live task gets a wake-up: its lease expired (the worker
     died: that counts as a failed attempt), its next attempt is due and was not published since,
     or its wake-up was published so long ago (`republish_after_seconds`) that it must be lost
     (Redis lost it, or a worker took it and died before claiming the job).
Correctness never depends on Redis keeping messages or on Celery's visibility timeout: a
duplicate wake-up finds nothing to claim.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from sqlalchemy import or_, update

from ..config import Settings
from ..index import Index, _insert, leases
from ..logs import log_event
from ..polling import PollingThread
from . import retry
from .jobs import JobStore
from .runtime import model_version

log = logging.getLogger(__name__)

COORDINATOR_LEASE = "pipeline-coordinator"


class Lease:
    """A named lease in the index: held by one owner until it expires unless renewed."""

    def __init__(self, index: Index, name: str, owner: str, ttl: float) -> None:
        self.index, self.name, self.owner, self.ttl = index, name, owner, ttl

    def hold(self, now: float | None = None) -> bool:
        """Take or renew the lease; False while another owner holds it."""
        now = time.time() if now is None else now
        with self.index._write() as conn:  # noqa: SLF001
            conn.execute(_insert(conn, leases).values(name=self.name, owner=self.owner, until=now + self.ttl)
                         .on_conflict_do_nothing(index_elements=["name"]))
            return bool(conn.execute(
                update(leases).where(leases.c.name == self.name, or_(leases.c.owner == self.owner, leases.c.until < now))
                .values(owner=self.owner, until=now + self.ttl).execution_options(preserve_rowcount=True)
            ).rowcount)

    def release(self) -> None:
        with self.index._write() as conn:  # noqa: SLF001
            conn.execute(update(leases).where(leases.c.name == self.name, leases.c.owner == self.owner).values(until=0.0))


def dispatch_pending(index: Index, jobs: JobStore, settings: Settings, publish=None) -> int:
    """Completed studies (outbox rows) become jobs; returns how many new jobs were created."""
    from .tasks import publish_job

    publish = publish or publish_job
    created = 0
    broker_up = True  # after one failed publish, the rest of the pass only creates jobs (no 4 s wait each)
    version = model_version(settings)
    for row in index.outbox_rows(pending_only=True):
        study = index.study(row.study_uid) or {}
        priority = "urgent" if study.get("urgent") else "routine"
        job, new = jobs.create(row.study_uid, row.id, row.instance_set_hash, version, priority)
        index.mark_job_created(row.id)
        if new:
            created += 1
            log_event(log, logging.INFO, "dispatch.job_created", study_uid=row.study_uid, job=job.job_key,
                      priority=priority, reason=row.reason)
            broker_up = broker_up and publish(jobs, job.job_key, job.state, job.priority)
    return created


def reconcile(jobs: JobStore, settings: Settings, publish=None, now: float | None = None) -> int:
    """Wake up every active job that has no live task; returns how many wake-ups were sent."""
    from .tasks import publish_job

    publish = publish or publish_job
    now = time.time() if now is None else now
    sent = 0
    for job in jobs.needing_wakeup(now, settings.republish_after_seconds):
        if job.lease_until is not None and job.lease_until < now:
            # The worker running the stage stopped renewing its lease: it died (or hangs).
            failures = job.stage_attempts + 1
            at, gave_up = retry.plan_retry(retry.UNKNOWN, job, now, settings)
            reason = f"{job.state}: the worker running it ({job.lease_owner}) stopped renewing its lease{gave_up}"
            state = jobs.fail(job, None, reason, retry.UNKNOWN, at)
            log_event(log, logging.WARNING if at else logging.ERROR, "job.lease_expired", job=job.job_key,
                      stage=job.state, owner=job.lease_owner, attempt=failures, final=at is None)
            if state is None or at is None or at > now:
                continue
        if not publish(jobs, job.job_key, job.state, job.priority):
            break  # the broker is away: the next pass tries again
        sent += 1
        log_event(log, logging.INFO, "job.republished", job=job.job_key, stage=job.state,
                  attempt=job.stage_attempts + 1, last_error=job.last_error[:200])
    return sent


class Coordinator(PollingThread):
    """Dispatch and reconcile every `dispatch_poll_seconds`, while holding the coordinator lease."""

    def __init__(self, index: Index, settings: Settings) -> None:
        from .app import configure
        from .tasks import publish_job  # Celery and the stages: imported here, not on the first pass

        configure(settings)
        self.publish = publish_job
        self.jobs = JobStore(index)
        self.index = index
        self.settings = settings
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # unique even for pid 1 in containers
        self.lease = Lease(index, COORDINATOR_LEASE, owner, ttl=max(10.0, 5 * settings.dispatch_poll_seconds))
        self.leading = False
        super().__init__("pipeline-coordinator", settings.dispatch_poll_seconds, self.run_pass)

    def run_pass(self) -> None:
        leading = self.lease.hold()
        if leading != self.leading:
            log_event(log, logging.INFO, "coordinator.lease", leading=leading, owner=self.lease.owner)
            self.leading = leading
        if not leading:
            return
        dispatch_pending(self.index, self.jobs, self.settings, self.publish)
        reconcile(self.jobs, self.settings, self.publish)

    def stop(self) -> None:
        super().stop()
        if self.leading:
            try:
                self.lease.release()  # another replica takes over at once rather than after the ttl
            except Exception:  # noqa: BLE001 - shutting down: the lease expires by itself
                log.warning("could not release the coordinator lease", exc_info=True)
