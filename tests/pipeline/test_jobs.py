"""The job row drives progress: claims, commits, retries by class and time, supersession, wake-ups.

These run the real task runner (tasks.run_stage) and coordinator passes against a real index,
with stage work stubbed by plain functions and the broker publish recorded (Celery's own
delivery is covered by the end-to-end and fault tests).
"""

from __future__ import annotations

import time

import pytest

from dicom_node.config import Settings
from dicom_node.pipeline import retry, tasks
from dicom_node.pipeline.reconciler import reconcile
from dicom_node.pipeline.runtime import Runtime
from dicom_node.pipeline.stages import StageOutput
from dicom_node.priors.model import ArchiveUnavailable, RetrieveRefused
from inference.errors import InputError


@pytest.fixture
def rt(tmp_path, monkeypatch) -> Runtime:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'index.db'}", storage_dir=tmp_path / "store",
                        work_dir=tmp_path / "jobs", min_free_disk_mb=1, retry_backoff_seconds=1, retry_backoff_max_seconds=4,
                        retry_horizon_seconds=3600, task_max_retries=2, job_lease_seconds=30)
    runtime = Runtime.build(settings)
    yield runtime
    runtime.index.dispose()


@pytest.fixture
def published(monkeypatch) -> list[tuple[str, str]]:
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(tasks, "publish", lambda stage, key, priority="routine": sent.append((stage, key)))
    return sent


def new_job(rt: Runtime, study: str = "1.2.3", instances: str = "set-a"):
    job, created = rt.jobs.create(study, 1, instances, "v1")
    assert created
    return job


def ok(rt, job) -> StageOutput:
    return StageOutput(None, {"ran": job.state})


def failing(exc: BaseException):
    def work(rt, job):
        raise exc
    return work


def test_a_stage_commits_and_publishes_the_next(rt, published):
    job = new_job(rt)
    assert tasks.run_stage(rt, "priors", job.job_key, ok) == "compare"
    after = rt.jobs.get(job.job_key)
    assert (after.state, after.lease_owner, after.result["ran"]) == ("compare", None, "priors")
    assert published == [("compare", job.job_key)] and after.published_at is not None


def test_duplicate_and_stale_wakeups_do_nothing(rt, published):
    job = new_job(rt)
    tasks.run_stage(rt, "priors", job.job_key, ok)
    ran = []
    assert tasks.run_stage(rt, "priors", job.job_key, lambda rt, j: ran.append(j) or ok(rt, j)) is None  # stage is past
    holder = rt.jobs.claim(job.job_key, "compare", "someone-else", 30)
    assert holder is not None
    assert tasks.run_stage(rt, "compare", job.job_key, lambda rt, j: ran.append(j) or ok(rt, j)) is None  # leased
    assert ran == []


def test_a_lost_lease_discards_the_result(rt, published):
    job = new_job(rt)
    claimed = rt.jobs.claim(job.job_key, "priors", "slow-worker", 30)
    # Its lease ran out and the reconciler gave the stage to another worker, which finished it.
    rt.jobs.fail(claimed, "slow-worker", "priors: lease expired", retry.UNKNOWN, time.time())
    assert tasks.run_stage(rt, "priors", job.job_key, ok) == "compare"
    assert rt.jobs.finish(claimed, "slow-worker", None, {"late": True}) is None
    assert "late" not in rt.jobs.get(job.job_key).result


def test_transient_errors_retry_by_time_not_by_count(rt, published):
    job = new_job(rt)
    outage = failing(ArchiveUnavailable("archive 'pacs': study query failed: could not connect"))
    for attempt in range(1, 8):  # far more attempts than task_max_retries=2: a PACS outage is not a poison job
        _make_due(rt, job.job_key)
        before = time.time()
        assert tasks.run_stage(rt, "priors", job.job_key, outage) == "priors"
        row = rt.jobs.get(job.job_key)
        assert (row.error_class, row.stage_attempts, row.lease_owner) == ("transient", attempt, None)
        assert before <= row.next_attempt_at <= time.time() + 4.01  # full jitter, capped at 4 s
        assert "could not connect" in row.last_error
    _rewrite(rt, job.job_key, next_attempt_at=time.time() + 60)
    assert tasks.run_stage(rt, "priors", job.job_key, outage) is None  # not due yet: nothing ran
    _make_due(rt, job.job_key)
    assert tasks.run_stage(rt, "priors", job.job_key, ok) == "compare"  # the PACS is back
    assert rt.jobs.get(job.job_key).last_error == ""


def test_transient_errors_fail_after_the_horizon(rt, published):
    job = new_job(rt)
    outage = failing(ArchiveUnavailable("down"))
    tasks.run_stage(rt, "priors", job.job_key, outage)
    _rewrite(rt, job.job_key, first_error_at=time.time() - 3601, next_attempt_at=0)
    assert tasks.run_stage(rt, "priors", job.job_key, outage) == "failed"
    assert "retry_horizon_seconds" in rt.jobs.get(job.job_key).last_error


@pytest.mark.parametrize("exc", [RetrieveRefused("register the node as a move destination"),
                                 InputError("x.dcm", "PixelSpacing", "zero"), retry.PermanentJobError("no images")])
def test_permanent_errors_fail_at_once_with_the_reason(rt, published, exc):
    job = new_job(rt)
    assert tasks.run_stage(rt, "priors", job.job_key, failing(exc)) == "failed"
    row = rt.jobs.get(job.job_key)
    assert row.error_class == "permanent" and str(exc) in row.last_error and row.stage_attempts == 1


def test_unknown_errors_have_an_attempt_budget(rt, published):
    job = new_job(rt)
    bug = failing(KeyError("unexpected"))
    states = []
    for _ in range(3):
        _make_due(rt, job.job_key)
        states.append(tasks.run_stage(rt, "priors", job.job_key, bug))
    assert states == ["priors", "priors", "failed"]  # task_max_retries=2
    assert "gave up after 3 unexplained failures" in rt.jobs.get(job.job_key).last_error


def test_a_dead_worker_after_an_outage_spends_only_the_unknown_budget(rt, published):
    """Chaos seed 5: six transient failures during a PACS outage, then the io worker was killed
    holding the stage. That is one unexplained failure, not the seventh of task_max_retries=2."""
    job = new_job(rt)
    outage = failing(ArchiveUnavailable("archive 'pacs': could not connect"))
    for _ in range(6):
        _make_due(rt, job.job_key)
        tasks.run_stage(rt, "priors", job.job_key, outage)
    _make_due(rt, job.job_key)
    dying = rt.jobs.claim(job.job_key, "priors", "killed-worker", lease_seconds=1)
    later = dying.lease_until + 1
    reconcile(rt.jobs, rt.settings, publish=lambda *a: True, now=later)
    row = rt.jobs.get(job.job_key)
    assert (row.state, row.stage_attempts, row.unknown_attempts) == ("priors", 7, 1)
    assert "stopped renewing its lease" in row.last_error and "gave up" not in row.last_error
    _make_due(rt, job.job_key)
    assert tasks.run_stage(rt, "priors", job.job_key, ok) == "compare"
    assert rt.jobs.get(job.job_key).unknown_attempts == 0  # a new stage starts with a fresh budget


def test_delivery_waits_without_limit_on_the_outbox_schedule(rt, published):
    job = new_job(rt)
    _rewrite(rt, job.job_key, state="deliver")
    before = time.time()
    tasks.run_stage(rt, "deliver", job.job_key, failing(retry.DeliveryPending("SR not accepted yet", retry_in=7)))
    row = rt.jobs.get(job.job_key)
    assert row.state == "deliver" and before + 7 <= row.next_attempt_at <= time.time() + 7  # the outbox's time
    _rewrite(rt, job.job_key, first_error_at=time.time() - 10 * 86400, next_attempt_at=0)
    assert tasks.run_stage(rt, "deliver", job.job_key, failing(retry.DeliveryPending("still not", 5))) == "deliver"


def test_a_newer_job_supersedes_one_that_has_not_reported(rt, published):
    older = new_job(rt, instances="partial")
    tasks.run_stage(rt, "priors", older.job_key, ok)  # now in compare
    reported = new_job(rt, study="9.9.9", instances="a")
    _rewrite(rt, reported.job_key, state="deliver")
    newer = new_job(rt, instances="complete")
    assert rt.jobs.get(older.job_key).state == "superseded"
    assert newer.job_key in rt.jobs.get(older.job_key).last_error
    assert rt.jobs.get(reported.job_key).state == "deliver"  # other studies untouched
    assert tasks.run_stage(rt, "compare", older.job_key, ok) is None  # its late wake-up does nothing


def test_reconciler_republishes_what_has_no_live_task(rt, published):
    settings = rt.settings.model_copy(update={"republish_after_seconds": 60})
    never = new_job(rt, study="1")  # created while the broker was down: never published
    sent = new_job(rt, study="2")
    rt.jobs.mark_published(sent.job_key, "priors")
    dead = new_job(rt, study="3")
    rt.jobs.claim(dead.job_key, "priors", "killed-worker", lease_seconds=5)
    now = time.time()
    reconcile(rt.jobs, settings, now=now)
    assert published == [("priors", never.job_key)]
    # Later: the dead worker's lease has run out, and the published wake-up of job 2 was lost.
    reconcile(rt.jobs, settings, now=now + 61 + 5)
    assert ("priors", sent.job_key) in published
    row = rt.jobs.get(dead.job_key)
    assert (row.error_class, row.attempts, row.lease_owner) == ("unknown", 1, None)
    assert "stopped renewing its lease" in row.last_error
    reconcile(rt.jobs, settings, now=row.next_attempt_at + 0.01)
    assert ("priors", dead.job_key) in published


def _make_due(rt: Runtime, key: str) -> None:
    _rewrite(rt, key, next_attempt_at=0)


def _rewrite(rt: Runtime, key: str, **values) -> None:
    from sqlalchemy import update

    from dicom_node.index import jobs

    with rt.index._write() as conn:
        conn.execute(update(jobs).where(jobs.c.job_key == key).values(**values))


def test_with_the_broker_away_a_pass_stops_at_the_first_failed_publish(rt):
    for study in ("1", "2", "3"):
        new_job(rt, study=study)
    attempts = []
    assert reconcile(rt.jobs, rt.settings, publish=lambda jobs, key, stage, priority: attempts.append(key) and False) == 0
    assert len(attempts) == 1  # not one connection timeout per job
    assert all(j.published_at is None for j in rt.jobs.list())  # all still due for the next pass
