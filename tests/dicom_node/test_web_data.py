"""What the dashboard and /metrics compute: queue depths over Celery's priority-step lists in a
real Redis, per-stage latencies and histograms from real job rows."""

from __future__ import annotations

import urllib.request

import pytest
import redis

from dicom_node.http_api import StatusServer
from dicom_node.index import Index
from dicom_node.pipeline.jobs import JobStore
from dicom_node.web import ops
from tests.support.node import node_settings
from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_url(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


def test_queue_depth_counts_every_priority_step_list(tmp_path, redis_url):
    client = redis.Redis.from_url(redis_url)
    client.lpush("io", "a", "b")  # step 0: urgent
    client.lpush("io\x06\x163", "c")
    client.lpush("io\x06\x166", "d", "e", "f")
    client.lpush("gpu\x06\x165", "g")
    client.hset("unacked", "tag1", "x")
    state = ops.broker_state(node_settings(tmp_path, broker_url=redis_url))
    depths = {q.queue: q for q in state.queues}
    assert not state.error
    assert depths["io"].waiting == 6 and depths["io"].by_step == {0: 2, 3: 1, 6: 3}
    assert depths["gpu"].waiting == 1 and depths["gpu"].by_step == {5: 1}
    assert state.unacked == 1


def test_an_unreachable_broker_is_reported_not_raised(tmp_path):
    from tests.support.procs import free_port

    state = ops.broker_state(node_settings(tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0"), timeout=1)
    assert state.queues == [] and "Connection" in state.error


def run_stage(store: JobStore, key: str, stage: str, started: float, seconds: float, monkeypatch) -> None:
    job = store.claim(key, stage, "test-worker", 60, now=started)
    assert job is not None
    with monkeypatch.context() as patch:
        patch.setattr("dicom_node.pipeline.jobs.time.time", lambda: started + seconds)  # finish() stamps the clock
        assert store.finish(job, "test-worker") is not None


def test_latencies_and_the_stage_histogram_come_from_the_job_rows(tmp_path, monkeypatch):
    settings = node_settings(tmp_path)
    index = Index(settings.database_url)
    store = JobStore(index)
    now = 1_800_000_000.0
    for number, seconds in enumerate((1.0, 2.0, 3.0, 40.0)):
        job, _ = store.create(f"1.2.3.{number}", number, f"set{number}", "v1", now=now)
        run_stage(store, job.job_key, "priors", now, seconds, monkeypatch)
    latency = {row.stage: row for row in ops.stage_latencies(store.list(10))}
    assert latency["priors"].count == 4 and latency["priors"].p50 == pytest.approx(2.5)
    assert latency["priors"].p95 == pytest.approx(34.45)
    assert latency["compare"].count == 0 and latency["compare"].p50 is None
    steps = {step.stage: step.status for step in ops.timeline(store.list(1)[0], now=now)}
    assert steps == {"priors": "done", "compare": "waiting", "report": "pending", "deliver": "pending", "notify": "pending"}

    server = StatusServer(index, settings.http_host, settings.http_port, settings)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.http_port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
        index.dispose()
    assert 'dicom_node_stage_seconds_count{stage="priors"} 4.0' in text
    assert 'dicom_node_stage_seconds_bucket{le="2.5",stage="priors"} 2.0' in text
    assert 'dicom_node_stage_seconds_bucket{le="60.0",stage="priors"} 4.0' in text
    assert 'dicom_node_stage_seconds_sum{stage="priors"} 46.0' in text
    assert 'dicom_node_stage_seconds_count{stage="compare"} 0.0' in text
    assert 'dicom_node_jobs{state="compare"} 4.0' in text


def test_text_from_dicom_and_errors_is_escaped_in_the_pages(tmp_path):
    """A header value or error message holding markup (a hostile or broken modality) is shown as text."""
    settings = node_settings(tmp_path)
    index = Index(settings.database_url)
    store = JobStore(index)
    job, _ = store.create("1.2.3.9", 9, "set9", "v1")
    job = store.claim(job.job_key, "priors", "test-worker", 60)
    store.fail(job, "test-worker", 'priors: InputError: StudyDescription "<script>alert(1)</script>"', "permanent", None)
    server = StatusServer(index, settings.http_host, settings.http_port, settings)
    server.start()
    try:
        for path in ("/", "/jobs", f"/jobs/{job.job_key}"):
            with urllib.request.urlopen(f"http://127.0.0.1:{settings.http_port}{path}", timeout=10) as response:
                html = response.read().decode()
            assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
    finally:
        server.stop()
        index.dispose()
