"""Job rows: the single source of truth for a study's progress through the pipeline.

One job per (study, instance set, model version): the job key is the idempotency key. A stage
*claims* its job (compare-and-set on the stage and an expired or absent lease), does its work,
then commits its artifact and the move to the next stage in one transaction, provided it still
holds the lease. Publishing the next stage's wake-up comes after that commit and may fail: the
reconciler republishes whatever is due and has no live task. Retry delays live in the row
(`next_attempt_at`), never in Celery countdowns.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from sqlalchemy import and_, or_, select, update

from ..index import Index, _insert, jobs

STAGES = ("priors", "compare", "report", "deliver", "notify")
FINAL_STATES = ("done", "failed", "superseded")
NEXT_STAGE = {"priors": "compare", "compare": "report", "report": "deliver", "deliver": "notify", "notify": "done"}
# Before the report is built, a newer job of the same study replaces an older one outright.
SUPERSEDABLE = ("priors", "compare")
# A worker whose clock is a little behind the coordinator's may still claim a stage just made due.
CLOCK_SKEW_SECONDS = 5.0


def job_key(study_uid: str, instance_set_hash: str, model_version: str) -> str:
    return hashlib.sha256(f"{study_uid}|{instance_set_hash}|{model_version}".encode()).hexdigest()[:32]


@dataclass
class Job:
    job_key: str
    study_uid: str
    outbox_id: int
    instance_set_hash: str
    model_version: str
    priority: str
    state: str
    attempts: int
    stage_attempts: int
    last_error: str
    error_class: str
    first_error_at: float | None
    next_attempt_at: float
    published_at: float | None
    lease_owner: str | None
    lease_until: float | None
    artifacts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    unknown_attempts: int = 0  # of stage_attempts, those of the unknown class (a dead worker, a bug)

    @classmethod
    def from_row(cls, row) -> "Job":
        values = dict(row._mapping)
        for name in ("artifacts", "timings", "result"):
            values[name] = json.loads(values[name] or "{}")
        return cls(**values)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class JobStore:
    def __init__(self, index: Index) -> None:
        self.index = index

    # --- reading ------------------------------------------------------------------------

    def get(self, key: str) -> Job | None:
        with self.index.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.job_key == key)).first()
        return Job.from_row(row) if row else None

    def list(self, limit: int = 50, state: str | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)
        if state:
            query = query.where(jobs.c.state == state)
        with self.index.engine.connect() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]

    def for_study(self, study_uid: str) -> list[Job]:
        """The study's jobs, oldest first."""
        with self.index.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.study_uid == study_uid).order_by(jobs.c.created_at, jobs.c.job_key))
            return [Job.from_row(row) for row in rows]

    def needing_wakeup(self, now: float, unclaimed_after: float) -> list[Job]:
        """Active jobs with no live task: a lease that expired, a stage due and never published
        since, or a wake-up published so long ago that it must have been lost."""
        active = jobs.c.state.in_(STAGES)
        expired = and_(jobs.c.lease_until.is_not(None), jobs.c.lease_until < now)
        free = jobs.c.lease_until.is_(None)
        due = jobs.c.next_attempt_at <= now
        unpublished = or_(jobs.c.published_at.is_(None), jobs.c.published_at < jobs.c.next_attempt_at,
                          jobs.c.published_at < now - unclaimed_after)
        query = select(jobs).where(active, or_(expired, and_(free, due, unpublished))).order_by(jobs.c.next_attempt_at)
        with self.index.engine.connect() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]

    # --- writing ------------------------------------------------------------------------

    def create(self, study_uid: str, outbox_id: int, instance_set_hash: str, model_version: str,
               priority: str = "routine", now: float | None = None) -> tuple[Job, bool]:
        """Insert the job unless it exists (same input set and model); returns it and whether it is new.
        Older jobs of the study that have not built their report yet are superseded by it."""
        key = job_key(study_uid, instance_set_hash, model_version)
        now = time.time() if now is None else now
        with self.index._write() as conn:  # noqa: SLF001 (the index's one-writer lock for SQLite)
            inserted = conn.execute(
                _insert(conn, jobs)
                .values(job_key=key, study_uid=study_uid, outbox_id=outbox_id, instance_set_hash=instance_set_hash,
                        model_version=model_version, priority=priority, state=STAGES[0], next_attempt_at=now,
                        artifacts="{}", timings="{}", result="{}", created_at=now, updated_at=now)
                .on_conflict_do_nothing(index_elements=["job_key"])
                .execution_options(preserve_rowcount=True)  # psycopg 3 reports -1 otherwise
            ).rowcount
            if inserted:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.study_uid == study_uid, jobs.c.job_key != key, jobs.c.state.in_(SUPERSEDABLE),
                           jobs.c.created_at <= now)
                    .values(state="superseded", lease_owner=None, lease_until=None, updated_at=now,
                            last_error=f"superseded by job {key} (instances arrived after this job started)")
                )
        job = self.get(key)
        assert job is not None
        return job, bool(inserted)

    def claim(self, key: str, stage: str, owner: str, lease_seconds: float, now: float | None = None) -> Job | None:
        """Take the job for `stage` if it is in that stage, due, and nobody holds a live lease."""
        now = time.time() if now is None else now
        with self.index._write() as conn:  # noqa: SLF001
            row = conn.execute(select(jobs.c.timings).where(jobs.c.job_key == key)).first()
            if row is None:
                return None
            timings = json.loads(row.timings or "{}")
            timings.setdefault(stage, {})["started"] = now
            got = conn.execute(
                update(jobs)
                .where(jobs.c.job_key == key, jobs.c.state == stage, jobs.c.next_attempt_at <= now + CLOCK_SKEW_SECONDS,
                       or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now))
                .values(lease_owner=owner, lease_until=now + lease_seconds, timings=json.dumps(timings), updated_at=now)
                .execution_options(preserve_rowcount=True)
            ).rowcount
        return self.get(key) if got else None

    def renew(self, key: str, owner: str, lease_seconds: float) -> bool:
        """Extend a lease we hold; False when it was lost (expired and taken, or the job moved on)."""
        now = time.time()
        with self.index._write() as conn:  # noqa: SLF001
            return bool(conn.execute(
                update(jobs).where(jobs.c.job_key == key, jobs.c.lease_owner == owner)
                .values(lease_until=now + lease_seconds)
                .execution_options(preserve_rowcount=True)
            ).rowcount)

    def finish(self, job: Job, owner: str, artifact: str | None = None, result: dict | None = None) -> str | None:
        """Commit the stage: its artifact, summary and the move to the next stage, in one transaction,
        only while `owner` still holds the lease. Returns the new state, or None when the lease was lost."""
        now = time.time()
        stage = job.state
        following = NEXT_STAGE[stage]
        with self.index._write() as conn:  # noqa: SLF001
            row = conn.execute(select(jobs.c.timings, jobs.c.result, jobs.c.artifacts).where(jobs.c.job_key == job.job_key)).first()
            timings = json.loads(row.timings or "{}")
            timings.setdefault(stage, {})["finished"] = now
            values: dict = dict(state=following, stage_attempts=0, unknown_attempts=0, last_error="", error_class="", first_error_at=None,
                                next_attempt_at=now, published_at=None, lease_owner=None, lease_until=None,
                                timings=json.dumps(timings), updated_at=now)
            if artifact is not None:
                values["artifacts"] = json.dumps({**json.loads(row.artifacts or "{}"), stage: artifact})
            if result:
                values["result"] = json.dumps({**json.loads(row.result or "{}"), **result}, default=str)
            got = conn.execute(
                update(jobs).where(jobs.c.job_key == job.job_key, jobs.c.state == stage, jobs.c.lease_owner == owner)
                .values(**values).execution_options(preserve_rowcount=True)
            ).rowcount
        return following if got else None

    def fail(self, job: Job, owner: str | None, error: str, error_class: str, retry_at: float | None) -> str | None:
        """Record a failed attempt of the job's stage: retried from `retry_at`, or failed for good when it
        is None. `owner` None: the lease already expired (the reconciler records a dead worker)."""
        now = time.time()
        values: dict = dict(last_error=error[:2000], error_class=error_class, attempts=jobs.c.attempts + 1,
                            stage_attempts=jobs.c.stage_attempts + 1,
                            unknown_attempts=jobs.c.unknown_attempts + int(error_class == "unknown"),
                            first_error_at=jobs.c.first_error_at if job.first_error_at else now,
                            lease_owner=None, lease_until=None, published_at=None, updated_at=now)
        if retry_at is None:
            values["state"] = "failed"
        else:
            values["next_attempt_at"] = retry_at
        lease = jobs.c.lease_owner == owner if owner is not None else jobs.c.lease_until == job.lease_until
        with self.index._write() as conn:  # noqa: SLF001
            got = conn.execute(
                update(jobs).where(jobs.c.job_key == job.job_key, jobs.c.state == job.state, lease)
                .values(**values).execution_options(preserve_rowcount=True)
            ).rowcount
        return ("failed" if retry_at is None else job.state) if got else None

    def mark_published(self, key: str, state: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.index._write() as conn:  # noqa: SLF001
            conn.execute(update(jobs).where(jobs.c.job_key == key, jobs.c.state == state).values(published_at=now))

    def reset(self, key: str) -> Job | None:
        """`dicom-node retry`: a failed (or stuck) job runs again from the start, now."""
        now = time.time()
        with self.index._write() as conn:  # noqa: SLF001
            conn.execute(
                update(jobs).where(jobs.c.job_key == key).values(
                    state=STAGES[0], attempts=0, stage_attempts=0, unknown_attempts=0, last_error="", error_class="", first_error_at=None,
                    next_attempt_at=now, published_at=None, lease_owner=None, lease_until=None, updated_at=now)
            )
        return self.get(key)

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func

        with self.index.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {state: count for state, count in rows}
