"""Celery tasks: each message only says "run stage S of job J"; the job row says whether to.

priors (io) -> compare (gpu) -> report (io) -> deliver (io) -> notify (io). A task claims its job
(stage and lease, compare-and-set), keeps the lease alive while it works, and commits the
stage's artifact with the move to the next stage; then it publishes the next wake-up, which may
fail (the reconciler republishes). A duplicate or stale message finds nothing to claim and does
nothing. Failures are recorded in the row with the time of the next attempt (retry.py); no
Celery retry or countdown is used, so nothing depends on a worker or Redis surviving.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from ..logs import log_event
from . import retry, stages
from .app import GPU_QUEUE, IO_QUEUE, app, priority_for
from .jobs import STAGES, Job, JobStore
from .runtime import Runtime, runtime

log = logging.getLogger(__name__)

STAGE_QUEUE = {"priors": IO_QUEUE, "compare": GPU_QUEUE, "report": IO_QUEUE, "deliver": IO_QUEUE, "notify": IO_QUEUE}


def publish(stage: str, key: str, priority: str = "routine") -> None:
    """Send the wake-up for `stage` of job `key` (raises when the broker is unreachable)."""
    TASKS[stage].apply_async((key,), queue=STAGE_QUEUE[stage], priority=priority_for(stage, priority),
                             retry=False)  # a failed publish is the reconciler's, not a blocking loop here


def publish_job(jobs: JobStore, key: str, stage: str, priority: str) -> bool:
    """Publish and record it; False (logged) when the broker is away: the reconciler tries again."""
    try:
        publish(stage, key, priority)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the row stays due
        log_event(log, logging.WARNING, "job.publish_failed", job=key, stage=stage, error=f"{type(exc).__name__}: {exc}")
        return False
    jobs.mark_published(key, stage)
    return True


_PROCESS_TOKEN = uuid.uuid4().hex[:8]  # hostname and pid alone repeat across containers (pid 1)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_TOKEN}:{threading.get_ident()}"


class LeaseKeeper:
    """Renews a job's lease while its stage runs; a killed worker stops renewing, so the lease
    expires and the reconciler hands the stage to another worker."""

    def __init__(self, jobs: JobStore, key: str, owner: str, lease_seconds: float) -> None:
        self.jobs, self.key, self.owner, self.lease_seconds = jobs, key, owner, lease_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{key[:8]}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                if not self.jobs.renew(self.key, self.owner, self.lease_seconds):
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - the database may be back before the lease runs out
                log.warning("lease renewal of job %s failed", self.key, exc_info=True)


def run_stage(rt: Runtime, stage: str, key: str, work: Callable[[Runtime, Job], stages.StageOutput]) -> str | None:
    """Claim, work, commit, publish the next stage. Returns the job's new state (None: nothing was done)."""
    owner = worker_id()
    lease = rt.settings.job_lease_seconds
    job = rt.jobs.claim(key, stage, owner, lease)
    if job is None:
        log_event(log, logging.DEBUG, "job.wakeup_ignored", job=key, stage=stage)
        return None
    log_event(log, logging.INFO, "job.stage_started", job=key, stage=stage, attempt=job.stage_attempts + 1)
    try:
        with LeaseKeeper(rt.jobs, key, owner, lease):
            output = work(rt, job)
    except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded in the row
        return record_failure(rt, job, owner, exc)
    finally:
        gc.collect()  # release what the job used before the next one
    state = rt.jobs.finish(job, owner, output.artifact, output.summary)
    if state is None:
        log_event(log, logging.WARNING, "job.lease_lost", job=key, stage=stage,
                  reason="another worker took the stage over, or a newer job superseded this one; result discarded")
        return None
    log_event(log, logging.INFO, "job.stage_done", job=key, stage=stage, next=state)
    if state in STAGES:
        publish_job(rt.jobs, key, state, job.priority)
    return state


def record_failure(rt: Runtime, job: Job, owner: str | None, exc: BaseException) -> str | None:
    now = time.time()
    error_class = retry.classify(exc)
    failures = job.stage_attempts + 1
    retry_in = exc.retry_in if isinstance(exc, retry.DeliveryPending) else None
    at, gave_up = retry.plan_retry(error_class, job, now, rt.settings, retry_in)
    reason = f"{job.state}: {type(exc).__name__}: {exc}{gave_up}"
    state = rt.jobs.fail(job, owner, reason, error_class, at)
    level = logging.ERROR if at is None else logging.WARNING
    log_event(log, level, "job.failed" if at is None else "job.stage_error", job=job.job_key, stage=job.state,
              error_class=error_class, attempt=failures, retry_in=None if at is None else round(at - now, 1), reason=reason)
    return state


def _task(stage: str, work: Callable[[Runtime, Job], stages.StageOutput]):
    @app.task(name=f"dicom_node.{stage}", ignore_result=True)
    def task(key: str) -> None:
        run_stage(runtime(), stage, key, work)

    return task


TASKS = {
    "priors": _task("priors", stages.run_priors),
    "compare": _task("compare", stages.run_compare),
    "report": _task("report", stages.run_report),
    "deliver": _task("deliver", stages.run_deliver),
    "notify": _task("notify", stages.run_notify),
}


def retry_job(rt: Runtime, key: str) -> Job | None:
    """`dicom-node retry JOB`: start a failed job again from the beginning."""
    return reset_job(rt.jobs, key)


def reset_job(jobs: JobStore, key: str) -> Job | None:
    """Reset the job to its first stage and publish its wake-up (the CLI's retry and the web UI's)."""
    job = jobs.reset(key)
    if job is not None:
        publish_job(jobs, key, job.state, job.priority)
    return job
