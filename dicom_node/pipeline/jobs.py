"""Job records: one per (study, instance set, model version), visible from arrival to delivery.

The job key is the idempotency key: a re-delivered task finds the job and re-runs its
stage with the same inputs, producing the same output UIDs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from sqlalchemy import select, update

from ..index import Index, _insert, jobs

# States: queued -> priors -> compare -> deliver -> notify -> done; failed at any stage (retryable from the CLI).

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
    last_error: str
    timings: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @classmethod
    def from_row(cls, row) -> "Job":
        values = dict(row._mapping)
        values["timings"] = json.loads(values["timings"] or "{}")
        values["result"] = json.loads(values["result"] or "{}")
        return cls(**values)


class JobStore:
    def __init__(self, index: Index) -> None:
        self.index = index

    def create(self, study_uid: str, outbox_id: int, instance_set_hash: str, model_version: str, priority: str = "routine") -> Job:
        """Insert the job unless it exists (same input set and model): returns it either way."""
        key = job_key(study_uid, instance_set_hash, model_version)
        now = time.time()
        with self.index._write() as conn:
            conn.execute(
                _insert(conn, jobs)
                .values(
                    job_key=key,
                    study_uid=study_uid,
                    outbox_id=outbox_id,
                    instance_set_hash=instance_set_hash,
                    model_version=model_version,
                    priority=priority,
                    state="queued",
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["job_key"])
            )
        job = self.get(key)
        assert job is not None
        return job

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
        with self.index.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.study_uid == study_uid).order_by(jobs.c.created_at))
            return [Job.from_row(row) for row in rows]

    def start_stage(self, key: str, stage: str) -> None:
        self._update_timing(key, stage, "started", state=stage)

    def finish_stage(self, key: str, stage: str, next_state: str, result: dict | None = None) -> None:
        self._update_timing(key, stage, "finished", state=next_state, result=result, clear_error=True)

    def record_error(self, key: str, error: str, failed: bool) -> None:
        values: dict = {"last_error": error[:2000], "updated_at": time.time(), "attempts": jobs.c.attempts + 1}
        if failed:
            values["state"] = "failed"
        with self.index._write() as conn:
            conn.execute(update(jobs).where(jobs.c.job_key == key).values(**values))

    def reset(self, key: str) -> Job | None:
        """Make a failed (or stuck) job runnable again from the start."""
        with self.index._write() as conn:
            conn.execute(
                update(jobs).where(jobs.c.job_key == key).values(state="queued", attempts=0, last_error="", updated_at=time.time())
            )
        return self.get(key)

    def _update_timing(self, key: str, stage: str, edge: str, state: str, result: dict | None = None, clear_error: bool = False) -> None:
        now = time.time()
        with self.index._write() as conn:
            row = conn.execute(select(jobs.c.timings, jobs.c.result).where(jobs.c.job_key == key)).first()
            if row is None:
                raise KeyError(f"no job {key}")
            timings = json.loads(row.timings or "{}")
            timings.setdefault(stage, {})[edge] = now
            values: dict = {"timings": json.dumps(timings), "state": state, "updated_at": now}
            if result is not None:
                values["result"] = json.dumps({**json.loads(row.result or "{}"), **result}, default=str)
            if clear_error:
                values["last_error"] = ""
            conn.execute(update(jobs).where(jobs.c.job_key == key).values(**values))
