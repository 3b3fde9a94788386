"""The one retry policy of the pipeline: by error class, and by time for transient errors.

- transient (a peer down or busy, a refused or aborted association, a timeout, Out of Resources,
  a move destination the PACS cannot reach yet, the broker or the database away, an overloaded
  model server): retried with capped exponential backoff and full jitter until
  `retry_horizon_seconds` after the stage's first failure;
- permanent (malformed data, a configuration the PACS or the node must change, a sanity-gate
  refusal, a RIS rejection): the job fails at once with the message saying what to fix;
- unknown (anything else, including a worker that died running the stage): retried like a
  transient error, but at most `task_max_retries` times, so a poison job cannot loop forever.

A report waiting in the delivery outbox is never given up: it is durable, and the PACS will
come back (DeliveryPending).
"""

from __future__ import annotations

from celery.utils.time import get_exponential_backoff_interval

from ..config import Settings

TRANSIENT = "transient"
PERMANENT = "permanent"
UNKNOWN = "unknown"


class PermanentJobError(Exception):
    """Retrying cannot help (bad input, configuration): the job fails at once with this message."""


class TransientJobError(Exception):
    """Worth another try later (e.g. waiting for an earlier job of the same study)."""


class DeliveryPending(Exception):
    """The SR is in the durable outbox but not accepted yet; tried again when next due, without limit."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


def _transient_types() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc
    from inference.vlm.errors import ModelServerUnavailable

    from ..priors.model import ArchiveUnavailable
    from ..scu import AssociationFailed
    from ..worklist import WorklistUnavailable

    return (TransientJobError, DeliveryPending, ArchiveUnavailable, AssociationFailed, WorklistUnavailable,
            ModelServerUnavailable, ConnectionError, TimeoutError, OSError, kombu.exceptions.OperationalError,
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, sqlalchemy.exc.OperationalError)


def _permanent_types() -> tuple[type[BaseException], ...]:
    from inference.errors import InputError
    from inference.vlm.errors import BackendUnavailableError, ModelConfigError, ModelNotFoundError, ModelServerRejected

    from ..priors.model import RetrieveRefused
    from ..worklist import WorklistRejected
    from .artifacts import ArtifactMissing

    return (PermanentJobError, ArtifactMissing, RetrieveRefused, WorklistRejected, InputError,
            ModelConfigError, ModelNotFoundError, BackendUnavailableError, ModelServerRejected)


def classify(exc: BaseException) -> str:
    if isinstance(exc, _permanent_types()):
        return PERMANENT
    if isinstance(exc, _transient_types()):
        return TRANSIENT
    return UNKNOWN


def backoff_seconds(failures: int, settings: Settings) -> float:
    """Delay before the next try after `failures` failed ones: Celery's exponential backoff with full
    jitter (computed in milliseconds: the helper works in whole units)."""
    millis = get_exponential_backoff_interval(
        factor=int(settings.retry_backoff_seconds * 1000), retries=max(failures - 1, 0),
        maximum=int(settings.retry_backoff_max_seconds * 1000), full_jitter=True)
    return millis / 1000


def next_attempt_at(error_class: str, failures: int, first_error_at: float, now: float, settings: Settings,
                    retry_in: float | None = None, unknown_failures: int = 0) -> float | None:
    """When to try again after the `failures`-th failed attempt of a stage, `unknown_failures` of them
    of the unknown class; None: give up (failed). Only unknown failures count against
    `task_max_retries`: a stage that met a 20 s PACS outage (transient) and then a killed worker
    (unknown) has had one unexplained failure, not six."""
    if error_class == PERMANENT:
        return None
    if error_class == UNKNOWN and unknown_failures > settings.task_max_retries:
        return None
    if error_class == TRANSIENT and retry_in is None and now - first_error_at > settings.retry_horizon_seconds:
        return None
    return now + (retry_in if retry_in is not None else backoff_seconds(failures, settings))


def plan_retry(error_class: str, job, now: float, settings: Settings,
               retry_in: float | None = None) -> tuple[float | None, str]:
    """For a failed attempt of `job`'s current stage (a jobs.Job): when to try again (None: give up)
    and the text to add to the error when giving up."""
    failures = job.stage_attempts + 1
    unknown_failures = job.unknown_attempts + (error_class == UNKNOWN)
    first = job.first_error_at or now
    at = next_attempt_at(error_class, failures, first, now, settings, retry_in, unknown_failures)
    if at is not None or error_class == PERMANENT:
        return at, ""
    if error_class == UNKNOWN:
        return None, f" (gave up after {unknown_failures} unexplained failures, {failures} attempts in all)"
    return None, f" (gave up after {failures} attempts over {now - first:.0f} s: retry_horizon_seconds)"
