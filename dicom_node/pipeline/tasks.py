"""Celery tasks: one per stage, each publishing the next when its work is durable.

priors (io) -> compare + SR (gpu) -> deliver (io) -> notify the worklist (io). Every task takes
only the job key:
its inputs are in the index and the job folder, so a re-delivered task simply re-runs.
"""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import Callable

from celery import Task

from ..logs import log_event
from . import stages
from .app import GPU_QUEUE, IO_QUEUE, app, priority_for
from .jobs import Job
from .runtime import Runtime, runtime

log = logging.getLogger(__name__)

NEXT_STAGE = {"priors": "compare", "compare": "deliver", "deliver": "notify", "notify": None}
STAGE_QUEUE = {"priors": IO_QUEUE, "compare": GPU_QUEUE, "deliver": IO_QUEUE, "notify": IO_QUEUE}


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: spreads retries of many jobs after an outage."""
    return random.uniform(0, min(cap, base * 2**attempt))


def publish(stage: str, key: str, priority: str = "routine", countdown: float | None = None) -> None:
    task = {"priors": fetch_priors, "compare": compare, "deliver": deliver, "notify": notify}[stage]
    task.apply_async((key,), queue=STAGE_QUEUE[stage], priority=priority_for(stage, priority), countdown=countdown)


def _run_stage(task: Task, stage: str, key: str, work: Callable[[Runtime, Job], dict]) -> None:
    rt = runtime()
    job = rt.jobs.get(key)
    if job is None:
        log_event(log, logging.ERROR, "job.unknown", job=key, stage=stage)
        return
    if job.state in ("done", "failed") or (job.state in NEXT_STAGE and _stage_index(job.state) > _stage_index(stage)):
        return  # a duplicate delivery of a stage already done: nothing to repeat
    rt.jobs.start_stage(key, stage)
    try:
        result = work(rt, job)
    except stages.DeliveryPending as exc:
        # The SR waits in the durable outbox: retried until the PACS accepts it, never given up.
        rt.jobs.record_error(key, f"{stage}: {exc}", failed=False)
        log_event(log, logging.WARNING, "job.delivery_pending", job=key, retry_in=round(exc.retry_in, 1), reason=str(exc))
        raise task.retry(countdown=exc.retry_in, max_retries=None)
    except stages.PermanentJobError as exc:
        rt.jobs.record_error(key, f"{stage}: {exc}", failed=True)
        log_event(log, logging.ERROR, "job.failed", job=key, stage=stage, reason=str(exc))
        return
    except Exception as exc:  # transient or unknown: retried with backoff, then failed with its reason
        attempt = task.request.retries
        final = attempt >= rt.settings.task_max_retries
        reason = f"{stage}: {type(exc).__name__}: {exc}"
        rt.jobs.record_error(key, reason + ("" if not final else f" (gave up after {attempt + 1} attempts)"), failed=final)
        log_event(log, logging.WARNING if not final else logging.ERROR, "job.stage_error", job=key, stage=stage, attempt=attempt, final=final, reason=reason)
        if final:
            return
        delay = backoff_seconds(attempt, rt.settings.retry_backoff_seconds, rt.settings.retry_backoff_max_seconds)
        raise task.retry(countdown=delay, max_retries=rt.settings.task_max_retries + 1)
    finally:
        gc.collect()  # release what the job used before the next one
    following = NEXT_STAGE[stage]
    rt.jobs.finish_stage(key, stage, following or "done", result)
    log_event(log, logging.INFO, "job.stage_done", job=key, stage=stage)
    if following:
        publish(following, key, job.priority)


def _stage_index(state: str) -> int:
    return list(NEXT_STAGE).index(state)


@app.task(bind=True, name="dicom_node.priors", max_retries=None)
def fetch_priors(self: Task, key: str) -> None:
    _run_stage(self, "priors", key, stages.run_priors)


@app.task(bind=True, name="dicom_node.compare", max_retries=None)
def compare(self: Task, key: str) -> None:
    _run_stage(self, "compare", key, stages.run_compare)


@app.task(bind=True, name="dicom_node.deliver", max_retries=None)
def deliver(self: Task, key: str) -> None:
    _run_stage(self, "deliver", key, stages.run_deliver)


@app.task(bind=True, name="dicom_node.notify", max_retries=None)
def notify(self: Task, key: str) -> None:
    _run_stage(self, "notify", key, stages.run_notify)


def retry_job(rt: Runtime, key: str) -> Job | None:
    """`dicom-node retry JOB`: start a failed job again from the beginning."""
    job = rt.jobs.reset(key)
    if job is not None:
        publish("priors", key, job.priority)
    return job
