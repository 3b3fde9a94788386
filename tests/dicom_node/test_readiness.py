"""/readyz against real parts: Redis, an archive answering C-ECHO (the node's own SCP), a
PostgreSQL refusing writes; and what it says when each is missing."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from dicom_node.index import Index
from dicom_node.priors.settings import ArchiveConfig, PriorSettings
from dicom_node.web.readiness import ReadinessChecker
from tests.support.node import NODE_AE, node_settings
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def check(tmp_path, redis_url):
    made = []

    def run(**overrides):
        values = dict(broker_url=redis_url, readiness_timeout_seconds=3.0)
        values.update(overrides)
        settings = node_settings(tmp_path, **values)
        index = Index(settings.database_url)
        checker = ReadinessChecker(settings, index)
        made.append((checker, index))
        return checker

    yield run
    for checker, index in made:
        checker.close()
        index.dispose()


def by_name(result) -> dict:
    return {c.name: c for c in result.checks}


def archive(name: str, port: int, required: bool = True) -> PriorSettings:
    return PriorSettings(archives=[ArchiveConfig(name=name, ae_title=NODE_AE, host="127.0.0.1", port=port,
                                                 timeout_seconds=3, required=required)])


def test_ready_when_index_storage_broker_and_archive_answer(check, node):
    result = check(priors=archive("pacs", node.settings.port)).run()
    checks = by_name(result)
    assert result.ready, result.to_dict()
    assert set(checks) == {"index", "storage", "broker", "archive pacs"}
    assert "C-ECHO" in checks["archive pacs"].detail and "PING" in checks["broker"].detail


def test_broker_down_is_degraded_not_unready_and_says_which_broker(check):
    """Ingest goes on without Redis (the index drives the pipeline): taking the SCP out of its
    Service for it would stop the modalities instead."""
    port = free_port()
    url = f"redis://:hunter2-password@127.0.0.1:{port}/0"
    result = check(broker_url=url).run()
    broker = by_name(result)["broker"]
    assert result.ready and not broker.ok and result.to_dict()["degraded"] == ["broker"]
    assert f"127.0.0.1:{port}" in broker.detail and "hunter2" not in broker.detail  # no password on the page
    assert all(c.ok for c in result.checks if c.name != "broker")
    strict = check(broker_url=url, readiness_includes_downstream=True).run()
    assert not strict.ready and strict.degraded == []


def test_disk_below_the_guard_is_not_ready(check):
    result = check(min_free_disk_mb=10**9).run()  # a petabyte guard: no disk has that much free
    storage = by_name(result)["storage"]
    assert not result.ready and not storage.ok
    assert "below min_free_disk_mb" in storage.detail and "refused" in storage.detail


def test_archive_down_is_degraded_and_the_answer_is_cached_briefly(check):
    port = free_port()
    checker = check(priors=archive("pacs", port), readiness_echo_cache_seconds=60)
    first = checker.run()
    pacs = by_name(first)["archive pacs"]
    assert first.ready and first.degraded == ["archive pacs"]
    assert not pacs.ok and f"127.0.0.1:{port}" in pacs.detail
    again = by_name(checker.run())["archive pacs"]
    assert not again.ok and again.detail.endswith("(cached)")
    assert not check(priors=archive("pacs", port), readiness_includes_downstream=True).run().ready


def test_an_optional_archive_down_is_shown_but_the_node_stays_ready(check):
    result = check(priors=archive("vna", free_port(), required=False), readiness_includes_downstream=True).run()
    vna = by_name(result)["archive vna"]
    assert result.ready and not vna.ok and not vna.required


def test_an_unresponsive_archive_is_bounded_by_the_timeout(check):
    import socket
    import time

    silent = socket.socket()  # accepts connections, never answers an A-ASSOCIATE-RQ
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        checker = check(priors=archive("slow", silent.getsockname()[1]), readiness_timeout_seconds=1.0,
                        readiness_includes_downstream=True)
        started = time.monotonic()
        result = checker.run()
        assert time.monotonic() - started < 5
        assert not result.ready and not by_name(result)["archive slow"].ok
    finally:
        silent.close()


def test_model_server_checked_only_with_the_openai_backend(check):
    port = free_port()
    result = check(vlm_backend="openai", vlm_base_url=f"http://127.0.0.1:{port}/v1",
                   readiness_includes_downstream=True).run()
    model = by_name(result)["model server"]
    assert not result.ready and not model.ok and f"127.0.0.1:{port}/v1/models" in model.detail
    assert "model server" not in by_name(check(vlm_base_url=f"http://127.0.0.1:{port}/v1").run())


def test_a_model_server_that_answers_is_ready(check, model_server):
    """The real OpenAI-compatible server of the suite (`transformers serve`, tiny model, CPU)."""
    result = check(vlm_backend="openai", vlm_base_url=model_server.server.base_url).run()
    model = by_name(result)["model server"]
    assert result.ready and model.ok and model.detail.endswith("/v1/models answered 200")


def test_an_index_refusing_writes_is_not_ready(tmp_path, redis_url, postgres_url):
    # PostgreSQL with read-only transactions: what a standby (or a failed-over primary) does.
    read_only = postgres_url + ("&" if "?" in postgres_url else "?") + "options=-c%20default_transaction_read_only%3Don"
    Index(postgres_url).dispose()  # the schema exists
    settings = node_settings(tmp_path, database_url=read_only, broker_url=redis_url)
    index = Index(read_only)
    checker = ReadinessChecker(settings, index)
    try:
        result = checker.run()
    finally:
        checker.close()
        index.dispose()
    index_check = by_name(result)["index"]
    assert not result.ready and not index_check.ok and "read-only" in index_check.detail


def test_readyz_over_http_503_for_a_full_disk_200_degraded_for_a_broker_down(tmp_path):
    from dicom_node.http_api import StatusServer

    settings = node_settings(tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0", min_free_disk_mb=10**9)
    index = Index(settings.database_url)
    server = StatusServer(index, settings.http_host, settings.http_port, settings)
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{settings.http_port}/readyz", timeout=10)
        assert error.value.code == 503
        body = json.loads(error.value.read())
        assert body["ready"] is False and body["degraded"] == ["broker"]
        assert any(c["name"] == "storage" and not c["ok"] and "min_free_disk_mb" in c["detail"] for c in body["checks"])
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.http_port}/healthz", timeout=10) as healthz:
            assert json.loads(healthz.read()) == {"ok": True}  # liveness does not depend on the broker
    finally:
        server.stop()
        index.dispose()
