"""Several SCP replicas on one index: what the pipeline guarantees when they run at the same time.

Each simulated replica is its own `Index(url)` (its own engine and connection pool, as a separate
process would have) on the same database: a SQLite file, and a real PostgreSQL. Threads give real
concurrency; a barrier lines them up so the racing statements meet in the database. Times are
passed with `now=` wherever the API takes it, so lease expiry and retry due times need no sleeping.

1. the coordinator lease is held by at most one replica at a time, and passes on after expiry or release;
2. two coordinators dispatching the same outbox create one job per row and publish it once;
3. a job's stage is claimed by exactly one worker; a late or foreign `finish` is discarded;
4. `Coordinator.run_pass` on two replicas at once: only the lease holder dispatches and republishes;
5. a worker that died holding a job's lease is a failed attempt of class "unknown", retried, then given up.
"""

from __future__ import annotations

import threading
import time
from io import BytesIO

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.index import Index, leases
from dicom_node.ingest import Ingestor
from dicom_node.pipeline import tasks
from dicom_node.pipeline.app import app as celery_app
from dicom_node.pipeline.jobs import JobStore
from dicom_node.pipeline.reconciler import COORDINATOR_LEASE, Coordinator, Lease, dispatch_pending, reconcile
from dicom_node.pipeline.runtime import model_version
from dicom_node.storage import InstanceStore
from dicom_node.synthetic import ct_slice

TASK_MAX_RETRIES = 2


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def replica(database_url):
    """`replica()`: a new Index on the shared database, as one more SCP process would open it."""
    opened: list[Index] = []

    def open_replica() -> Index:
        index = Index(database_url)
        opened.append(index)
        return index

    yield open_replica
    for index in opened:  # before postgres_url drops the database
        index.dispose()


@pytest.fixture
def settings(database_url, tmp_path) -> Settings:
    return Settings(database_url=database_url, storage_dir=tmp_path / "store", work_dir=tmp_path / "jobs",
                    min_free_disk_mb=1, broker_url="redis://127.0.0.1:9/0", result_backend="redis://127.0.0.1:9/1",
                    retry_backoff_seconds=0.5, retry_backoff_max_seconds=2, retry_horizon_seconds=3600,
                    task_max_retries=TASK_MAX_RETRIES, job_lease_seconds=30, republish_after_seconds=120,
                    dispatch_poll_seconds=1)


class Recorder:
    """A `publish(jobs, key, stage, priority) -> bool` for dispatch_pending / reconcile that records
    every wake-up (and the thread that sent it) and marks it published like tasks.publish_job does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []  # (thread name, job key, stage)
        self.now: float | None = None  # the published_at to record (None: the real time)
        self._lock = threading.Lock()

    def __call__(self, jobs: JobStore, key: str, stage: str, priority: str) -> bool:
        with self._lock:
            self.calls.append((threading.current_thread().name, key, stage))
        jobs.mark_published(key, stage, now=self.now)
        return True

    def keys(self) -> list[str]:
        with self._lock:
            return [key for _, key, _ in self.calls]


def run_together(*targets, timeout: float = 30.0) -> list:
    """Run each callable in its own thread, all released at once; returns their results in order
    (re-raising the first exception)."""
    barrier = threading.Barrier(len(targets))
    results: list = [None] * len(targets)
    errors: list[BaseException] = []

    def runner(slot: int, target) -> None:
        try:
            barrier.wait()
            results[slot] = target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(slot, target), name=f"t{slot}") for slot, target in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a racing thread hung"
    if errors:
        raise errors[0]
    return results


def receive_study(index: Index, store_dir, instances: int = 2, study_uid: str | None = None,
                  series_uid: str | None = None, first: int = 1) -> str:
    """Store a small CT study through the real ingest path; returns its Study Instance UID."""
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    ingestor = Ingestor(InstanceStore(store_dir), index)
    for number in range(first, first + instances):
        buffer = BytesIO()
        ct_slice(study_uid, series_uid, number).save_as(buffer, enforce_file_format=True)
        result = ingestor.ingest(buffer.getvalue())
        assert result.ok, result.message
    return study_uid


# --- 1. the coordinator lease ---------------------------------------------------------------


def test_lease_passes_on_only_after_expiry_or_release(replica):
    a = Lease(replica(), COORDINATOR_LEASE, "a", ttl=1.0)
    b = Lease(replica(), COORDINATOR_LEASE, "b", ttl=1.0)
    t = time.time()
    assert a.hold(now=t)
    assert not b.hold(now=t)
    assert not b.hold(now=t + 0.99)
    assert a.hold(now=t + 0.5)  # renewed: now until t + 1.5
    assert not b.hold(now=t + 1.4)
    assert b.hold(now=t + 1.51)  # "a" stopped renewing: "b" takes over after the expiry
    assert not a.hold(now=t + 1.6)  # and "a" cannot take it back while "b" renews
    assert b.hold(now=t + 2.0)
    a.release()  # not the owner: nothing happens
    assert not a.hold(now=t + 2.1)
    b.release()  # the owner shuts down: the other takes over at once, without waiting for the ttl
    assert a.hold(now=t + 2.1)
    assert not b.hold(now=t + 2.2)


def test_first_hold_races_one_winner(replica):
    """Many replicas taking a lease that does not exist yet (INSERT .. ON CONFLICT and UPDATE race)."""
    indexes = [replica() for _ in range(4)]
    t = time.time()
    for round_ in range(8):
        name = f"race-{round_}"
        contenders = [Lease(index, name, f"owner-{n}", ttl=5.0) for n, index in enumerate(indexes)]
        won = run_together(*[lambda lease=lease: lease.hold(now=t) for lease in contenders])
        assert won.count(True) == 1, won
        with indexes[0].engine.connect() as conn:
            owner = conn.execute(select(leases.c.owner).where(leases.c.name == name)).scalar_one()
        assert owner == contenders[won.index(True)].owner


def test_lease_is_never_held_by_two_replicas_at_once(replica):
    """Three replicas hammer hold() from their own threads; a holder keeps it a while, then either
    stops renewing (dies) or releases it. The spans in which each believed it held the lease never
    overlap: from hold() returning True until `now + ttl`, or until release() was called."""
    ttl = 0.25
    run_for = 1.2
    names = ["a", "b", "c"]
    lease_of = {name: Lease(replica(), COORDINATOR_LEASE, name, ttl) for name in names}
    spans: dict[str, list[list[float]]] = {name: [] for name in names}
    barrier = threading.Barrier(len(names))
    errors: list[BaseException] = []

    def replica_loop(name: str, seed: int) -> None:
        lease, mine = lease_of[name], spans[name]
        rounds = 0
        try:
            barrier.wait()
            end = time.time() + run_for
            while time.time() < end:
                now = time.time()
                if not lease.hold(now=now):
                    time.sleep(0.002)
                    continue
                returned = time.time()
                if mine and mine[-1][1] >= now:  # a renewal of the span we hold
                    mine[-1][1] = now + ttl
                else:
                    mine.append([returned, now + ttl])
                if now - mine[-1][0] > 0.1:  # held long enough: let it go, two ways in turn
                    rounds += 1
                    if (rounds + seed) % 2:
                        mine[-1][1] = min(mine[-1][1], time.time())  # no longer ours from this moment
                        lease.release()
                        time.sleep(0.05)
                    else:
                        time.sleep(ttl * 1.5)  # stops renewing (a dead or hung replica)
                else:
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=replica_loop, args=(name, n), name=f"replica-{name}") for n, name in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(run_for + 30)
    assert not errors, errors
    everyone = sorted((start, stop, name) for name in names for start, stop in spans[name])
    assert len({name for _, _, name in everyone}) >= 2, everyone  # it did change hands
    assert len(everyone) >= 4, everyone
    for (start, stop, name), (next_start, _, next_name) in zip(everyone, everyone[1:]):
        if name != next_name:
            assert stop < next_start, f"{name} held the lease until {stop} but {next_name} took it at {next_start}"
    # A span of the same replica never overlaps another replica's either (not just its neighbour).
    for name in names:
        for start, stop in spans[name]:
            for other_start, other_stop, other in everyone:
                if other != name:
                    assert other_stop < start or stop < other_start, (name, start, stop, other, other_start, other_stop)


# --- 2. dispatch from two coordinators at once ----------------------------------------------


def test_two_coordinators_dispatching_at_once_create_each_job_once(replica, settings, tmp_path):
    first = replica()
    studies = [receive_study(first, tmp_path / "store") for _ in range(6)]
    late = studies[0]
    assert first.complete_study(late) is not None
    receive_study(first, tmp_path / "store", instances=1, study_uid=late, first=3)  # reopens it: a reanalysis
    for study in studies:
        assert first.complete_study(study) is not None
    rows = first.outbox_rows(pending_only=True)
    assert len(rows) == 7

    recorder = Recorder()
    indexes = [first, replica(), replica()]
    created = run_together(*[lambda index=index: dispatch_pending(index, JobStore(index), settings, publish=recorder)
                             for index in indexes])

    jobs = JobStore(first)
    every = [job for study in studies for job in jobs.for_study(study)]
    assert sum(created) == len(rows) == len(every)
    assert sorted(job.outbox_id for job in every) == sorted(row.id for row in rows)  # one job per outbox row
    assert sorted(recorder.keys()) == sorted(job.job_key for job in every)  # each first wake-up sent once in all
    assert {stage for _, _, stage in recorder.calls} == {"priors"}
    assert first.outbox_rows(pending_only=True) == []
    older, newer = jobs.for_study(late)
    assert (older.state, newer.state) == ("superseded", "priors")  # the reanalysis replaces the first set
    assert all(job.model_version == model_version(settings) for job in every)

    # Dispatching again (any replica) finds nothing to do.
    assert run_together(*[lambda index=index: dispatch_pending(index, JobStore(index), settings, publish=recorder)
                          for index in indexes]) == [0, 0, 0]
    assert len(recorder.calls) == len(rows)


# --- 3. claims --------------------------------------------------------------------------------


def test_one_claim_wins_and_a_lost_lease_discards_the_result(replica):
    stores = [JobStore(replica()), JobStore(replica())]
    t = time.time()
    for study in ("1.2.3.1", "1.2.3.2", "1.2.3.3"):
        job, new = stores[0].create(study, 1, "set", "v1", now=t)
        assert new
        key = job.job_key
        owners = [f"worker-{n}" for n in range(8)]

        got = run_together(*[lambda n=n, owner=owner: stores[n % 2].claim(key, "priors", owner, lease_seconds=30, now=t)
                             for n, owner in enumerate(owners)])
        winners = [(owner, claimed) for owner, claimed in zip(owners, got) if claimed is not None]
        assert len(winners) == 1, got
        owner, claimed = winners[0]
        assert (claimed.lease_owner, claimed.lease_until) == (owner, t + 30)
        other = next(name for name in owners if name != owner)

        assert stores[1].finish(claimed, other, result={"by": other}) is None  # not the owner: nothing changes
        assert stores[0].get(key).state == "priors"
        assert stores[1].claim(key, "priors", other, lease_seconds=30, now=t + 29.9) is None  # lease still live
        assert stores[1].claim(key, "compare", other, lease_seconds=30, now=t + 31) is None  # not in that stage

        # The owner stops renewing; after the lease runs out the stage goes to one of the others.
        late = [name for name in owners if name != owner]
        again = run_together(*[lambda n=n, name=name: stores[n % 2].claim(key, "priors", name, lease_seconds=30, now=t + 31)
                               for n, name in enumerate(late)])
        taken = [(name, job) for name, job in zip(late, again) if job is not None]
        assert len(taken) == 1, again
        new_owner, retaken = taken[0]
        assert stores[0].finish(claimed, owner, result={"by": owner}) is None  # the old owner's result is discarded
        assert stores[0].get(key).lease_owner == new_owner
        assert stores[1].finish(retaken, new_owner, result={"by": new_owner}) == "compare"
        done = stores[0].get(key)
        assert (done.state, done.lease_owner, done.lease_until, done.result) == ("compare", None, None, {"by": new_owner})
        assert stores[0].finish(claimed, owner) is None  # and a replay of it later still does nothing


def test_racing_finish_and_claim_after_expiry_one_outcome(replica):
    """The old owner finishing just as another worker claims the expired stage: either its result
    counts and the claim finds nothing, or the claim wins and the result is discarded; never both."""
    stores = [JobStore(replica()), JobStore(replica())]
    t = time.time()
    for round_ in range(6):
        job, _ = stores[0].create(f"2.2.{round_}", 1, "set", "v1", now=t)
        claimed = stores[0].claim(job.job_key, "priors", "slow", lease_seconds=1, now=t)
        assert claimed is not None
        finished, taken = run_together(lambda: stores[0].finish(claimed, "slow", result={"by": "slow"}),
                                       lambda: stores[1].claim(job.job_key, "priors", "fresh", lease_seconds=30,
                                                               now=time.time() + 5))
        row = stores[0].get(job.job_key)
        if finished == "compare":
            assert taken is None
            assert (row.state, row.lease_owner, row.result) == ("compare", None, {"by": "slow"})
        else:
            assert finished is None and taken is not None
            assert (row.state, row.lease_owner, row.result) == ("priors", "fresh", {})


# --- 4. only the lease holder coordinates -----------------------------------------------------


@pytest.fixture
def published(monkeypatch):
    """tasks.publish recorded with the sending thread (the real publish_job marks the row)."""
    sent: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def publish(stage: str, key: str, priority: str = "routine") -> None:
        with lock:
            sent.append((threading.current_thread().name, key, stage))

    monkeypatch.setattr(tasks, "publish", publish)
    return sent


@pytest.fixture
def coordinators(replica, settings):
    """`coordinators(n)`: n Coordinators, each on its own replica and with its own lease owner (in one
    test process they would otherwise all be hostname:pid). Celery's configuration is restored after."""
    saved = {key: celery_app.conf[key] for key in ("broker_url", "result_backend", "broker_transport_options",
                                                   "result_backend_transport_options", "worker_max_memory_per_child")}
    made: list[Coordinator] = []

    def make(n: int) -> list[Coordinator]:
        for number in range(n):
            coordinator = Coordinator(replica(), settings)
            coordinator.lease = Lease(coordinator.index, COORDINATOR_LEASE, f"replica-{number}", coordinator.lease.ttl)
            made.append(coordinator)
        return made

    yield make
    for coordinator in made:
        coordinator.stop()
    celery_app.conf.update(saved)


def test_only_the_leader_dispatches_and_reconciles(coordinators, published, settings, tmp_path):
    first, second = coordinators(2)
    studies = [receive_study(first.index, tmp_path / "store") for _ in range(4)]
    for study in studies:
        assert first.index.complete_study(study) is not None
    # Jobs created while the broker was down: due, never published (the reconciler's to wake up).
    stranded = [first.jobs.create(f"3.3.{n}", 0, "set", model_version(settings))[0].job_key for n in range(3)]

    def passes(coordinator: Coordinator) -> list[bool]:
        leading = []
        for _ in range(5):
            coordinator.run_pass()
            leading.append(coordinator.leading)
        return leading

    first_leading, second_leading = run_together(lambda: passes(first), lambda: passes(second))
    # One of them took the lease and kept it (each pass renews it); the other never led.
    assert {tuple(first_leading), tuple(second_leading)} == {(True,) * 5, (False,) * 5}
    leader, follower = (first, second) if first.leading else (second, first)
    leader_thread = "t0" if leader is first else "t1"
    assert {thread for thread, _, _ in published} == {leader_thread}, published
    dispatched = [job.job_key for study in studies for job in leader.jobs.for_study(study)]
    assert len(dispatched) == len(studies)
    assert sorted(key for _, key, _ in published) == sorted(dispatched + stranded)  # each woken once, not per pass

    # The leader shuts down (releases the lease): the other replica takes over at its next pass.
    leader.stop()
    extra = receive_study(follower.index, tmp_path / "store")
    assert follower.index.complete_study(extra) is not None
    published.clear()
    follower.run_pass()
    assert follower.leading
    [job] = follower.jobs.for_study(extra)
    assert published == [("MainThread", job.job_key, "priors")]
    assert not leader.lease.hold()  # and a pass the old leader might still run would not lead


# --- 5. a worker that died holding a lease ---------------------------------------------------


def test_dead_workers_are_failed_attempts_then_the_job_gives_up(replica, settings):
    jobs = JobStore(replica())
    recorder = Recorder()
    job, _ = jobs.create("5.5.5", 1, "set", "v1")
    key = job.job_key
    t = time.time()
    for death in range(1, TASK_MAX_RETRIES + 2):
        assert jobs.claim(key, "priors", f"dead-worker-{death}", lease_seconds=1, now=t) is not None
        recorder.now = t + 0.5
        assert reconcile(jobs, settings, publish=recorder, now=t + 0.5) == 0  # lease still live: nothing to do
        assert recorder.calls == []

        now = t + 1.01  # the lease ran out, never renewed
        recorder.now = now
        reconcile(jobs, settings, publish=recorder, now=now)
        row = jobs.get(key)
        assert (row.attempts, row.stage_attempts, row.error_class) == (death, death, "unknown")
        assert row.lease_owner is None and row.lease_until is None
        assert f"the worker running it (dead-worker-{death}) stopped renewing its lease" in row.last_error
        if death > TASK_MAX_RETRIES:
            break
        assert row.state == "priors"
        assert now <= row.next_attempt_at <= now + settings.retry_backoff_max_seconds
        if row.next_attempt_at > now:  # not due yet (the backoff's full jitter may make it 0)
            assert recorder.calls == []
            recorder.now = row.next_attempt_at + 0.01
            assert reconcile(jobs, settings, publish=recorder, now=row.next_attempt_at + 0.01) == 1
        assert recorder.keys() == [key]  # republished once it was due, exactly once
        recorder.now = row.next_attempt_at + 0.02
        assert reconcile(jobs, settings, publish=recorder, now=row.next_attempt_at + 0.02) == 0  # not again
        recorder.calls.clear()
        t = row.next_attempt_at + 0.05  # the next worker takes it ... and dies too

    assert row.state == "failed"
    assert f"gave up after {TASK_MAX_RETRIES + 1} unexplained failures" in row.last_error
    assert recorder.calls == []
    assert reconcile(jobs, settings, publish=recorder, now=t + 3600) == 0
    assert jobs.claim(key, "priors", "late-worker", lease_seconds=1, now=t + 3600) is None


def test_a_dead_worker_is_counted_once_by_racing_reconcilers(replica, settings):
    """Only the lease holder reconciles, but across a lease handover two passes may overlap: the
    death is recorded by compare-and-set on the expired lease, so it counts one attempt, not two."""
    stores = [JobStore(replica()), JobStore(replica())]
    t = time.time()
    keys = []
    for n in range(5):
        job, _ = stores[0].create(f"6.6.{n}", 1, "set", "v1", now=t)
        assert stores[0].claim(job.job_key, "priors", f"dead-{n}", lease_seconds=1, now=t) is not None
        keys.append(job.job_key)
    recorder = Recorder()
    run_together(*[lambda store=store: reconcile(store, settings, publish=recorder, now=t + 2) for store in stores])
    for key in keys:
        row = stores[0].get(key)
        assert (row.attempts, row.stage_attempts, row.state, row.error_class) == (1, 1, "priors", "unknown")
