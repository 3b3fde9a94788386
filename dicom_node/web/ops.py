"""What the operations pages show, read from the index, the job artifacts and the broker.

Everything here is read-only and tolerant: a missing artifact or an unreachable broker becomes
a line on the page saying so, never an error page.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from ..config import Settings
from ..index import Index, report_deliveries
from ..pipeline.jobs import STAGES, Job, JobStore

# kombu's Redis transport keeps one list per priority step: "io", "io\x06\x161", ... "io\x06\x169".
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = range(10)
QUEUES = ("io", "gpu")


# --- dashboard ------------------------------------------------------------------------------


@dataclass
class QueueDepth:
    queue: str
    waiting: int  # messages in every priority-step list of the queue
    by_step: dict[int, int] = field(default_factory=dict)  # non-empty steps only


@dataclass
class BrokerState:
    queues: list[QueueDepth] = field(default_factory=list)
    unacked: int = 0  # delivered to a worker, not yet acknowledged
    error: str = ""  # the broker could not be asked


def queue_list_names(queue: str) -> list[tuple[int, str]]:
    return [(step, queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}") for step in PRIORITY_STEPS]


def broker_state(settings: Settings, timeout: float = 2.0) -> BrokerState:
    import redis

    state = BrokerState()
    try:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            with client.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    for _, name in queue_list_names(queue):
                        pipe.llen(name)
                pipe.hlen("unacked")
                lengths = pipe.execute()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any broker failure is shown, not raised
        state.error = f"{type(exc).__name__}: {exc}"
        return state
    position = 0
    for queue in QUEUES:
        depth = QueueDepth(queue, 0)
        for step, _ in queue_list_names(queue):
            count = int(lengths[position])
            position += 1
            depth.waiting += count
            if count:
                depth.by_step[step] = count
        state.queues.append(depth)
    state.unacked = int(lengths[position])
    return state


def stage_seconds(job: Job) -> dict[str, float]:
    """Each finished stage's duration (its last attempt)."""
    seconds = {}
    for stage in STAGES:
        timing = job.timings.get(stage, {})
        if "started" in timing and "finished" in timing and timing["finished"] >= timing["started"]:
            seconds[stage] = timing["finished"] - timing["started"]
    return seconds


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass
class StageLatency:
    stage: str
    count: int
    p50: float | None
    p95: float | None


def stage_latencies(jobs: list[Job]) -> list[StageLatency]:
    rows = []
    for stage in STAGES:
        values = sorted(s[stage] for s in map(stage_seconds, jobs) if stage in s)
        rows.append(StageLatency(stage, len(values), percentile(values, 50) if values else None,
                                 percentile(values, 95) if values else None))
    return rows


@dataclass
class Dashboard:
    counts: dict[str, int]
    jobs_by_state: dict[str, int]
    broker: BrokerState
    latencies: list[StageLatency]
    failures: list[Job]  # failed for good, newest first
    retrying: list[Job]  # active jobs whose last attempt failed
    window: int  # the latencies are over this many most recent jobs


def dashboard(settings: Settings, index: Index, window: int = 500) -> Dashboard:
    store = JobStore(index)
    recent = store.list(window)
    return Dashboard(
        counts=index.counts(),
        jobs_by_state=store.counts(),
        broker=broker_state(settings),
        latencies=stage_latencies(recent),
        failures=store.list(20, "failed"),
        retrying=[job for job in recent if job.last_error and not job.finished][:20],
        window=window,
    )


# --- jobs -----------------------------------------------------------------------------------


@dataclass
class StageStep:
    stage: str
    status: str  # done | running | waiting | failed | pending
    seconds: float | None = None
    started_at: float | None = None


def timeline(job: Job, now: float | None = None) -> list[StageStep]:
    """The job's path through the stages, one step per stage, for the jobs list and job page."""
    now = time.time() if now is None else now
    steps = []
    done = stage_seconds(job)
    current = STAGES.index(job.state) if job.state in STAGES else None
    failed_at = _failed_stage(job)
    for position, stage in enumerate(STAGES):
        timing = job.timings.get(stage, {})
        if stage == failed_at:
            status = "failed"
        elif stage in done and (current is None or position < current):
            status = "done"
        elif current == position:
            status = "running" if job.lease_until and job.lease_until > now else "waiting"
        else:
            status = "pending"
        steps.append(StageStep(stage, status, done.get(stage), timing.get("started")))
    return steps


def _failed_stage(job: Job) -> str | None:
    if job.state != "failed":
        return None
    stage = job.last_error.split(":", 1)[0]  # tasks.record_failure writes "<stage>: <error>"
    return stage if stage in STAGES else None


# --- one job --------------------------------------------------------------------------------


@dataclass
class JobPage:
    job: Job
    steps: list[StageStep]
    study: dict | None
    priors: object | None = None  # PriorRetrieval
    comparison: object | None = None  # artifacts.Comparison
    reading: object | None = None  # report.reading.Reading
    overlay: Path | None = None
    deliveries: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    other_jobs: list[Job] = field(default_factory=list)  # the study's other jobs (revisions, superseded)
    notes: list[str] = field(default_factory=list)  # artifacts that could not be read, and why


def job_page(settings: Settings, index: Index, job: Job) -> JobPage:
    from ..pipeline import artifacts
    from ..report.reading import Reading

    page = JobPage(job, timeline(job), index.study(job.study_uid))
    readers = {"priors": artifacts.read_priors, "compare": artifacts.read_comparison,
               "report": lambda path: Reading.from_json(Path(path).read_bytes())}
    for stage, read in readers.items():
        path = job.artifacts.get(stage)
        if not path:
            continue
        try:
            value = read(Path(path))
        except Exception as exc:  # noqa: BLE001 - shown on the page
            page.notes.append(f"{stage} artifact {path} could not be read: {type(exc).__name__}: {exc}")
            continue
        setattr(page, {"priors": "priors", "compare": "comparison", "report": "reading"}[stage], value)
    if page.comparison is not None and page.comparison.overlay_png:
        overlay = Path(page.comparison.overlay_png)
        if overlay.is_file() and _inside(overlay, Path(settings.work_dir)):
            page.overlay = overlay
    with index.engine.connect() as conn:
        rows = conn.execute(select(report_deliveries).where(report_deliveries.c.study_uid == job.study_uid)
                            .order_by(report_deliveries.c.id))
        page.deliveries = [dict(row._mapping) for row in rows]
    if page.reading is not None:
        mine = {page.reading.sr_sop_instance_uid, page.reading.overlay_sop_instance_uid} - {""}
        page.deliveries = [row for row in page.deliveries if row["sop_instance_uid"] in mine]
    page.audit = index.phi_accesses(job.study_uid, 200)
    page.other_jobs = [other for other in JobStore(index).for_study(job.study_uid) if other.job_key != job.job_key]
    return page


def overlay_path(settings: Settings, job: Job) -> Path | None:
    from ..pipeline import artifacts

    path = job.artifacts.get("compare")
    if not path:
        return None
    try:
        overlay = artifacts.read_comparison(Path(path)).overlay_png
    except Exception:  # noqa: BLE001 - no overlay to show
        return None
    if not overlay or not Path(overlay).is_file() or not _inside(Path(overlay), Path(settings.work_dir)):
        return None
    return Path(overlay)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True
