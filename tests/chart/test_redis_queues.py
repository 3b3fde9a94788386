"""The chart against a real Redis (Debian redis-server): the KEDA triggers count every Redis list
that Celery's priority steps split a queue into, and the bundled Redis's password URL as the
chart renders it is what Celery connects with."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest
import redis as redis_client
from celery import Celery

from dicom_node.local_stack.procs import free_port, stop, wait_for_port
from dicom_node.pipeline.app import app as node_app

from .helm import find, render
from .value_sets import value_sets

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_with_password(tmp_path):
    """A real redis-server on a loopback port, with requirepass as the chart's Redis has."""
    assert shutil.which("redis-server"), "redis-server missing: apt-get install redis-server"
    docs = render({})
    password = base64.b64decode(find(docs, "Secret", "-credentials")["data"]["redis-password"]).decode()
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--dir", str(tmp_path), "--requirepass", password],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield port, password, docs
    finally:
        stop(proc)


def _rendered_url(docs: list[dict], variable: str, password: str, port: int) -> str:
    env = {e["name"]: e for e in find(docs, "Deployment", "-worker-io")["spec"]["template"]["spec"]["containers"][0]["env"]}
    # What Kubernetes does: $(REDIS_PASSWORD) from the entry before; the Service name -> loopback.
    url = env[variable]["value"].replace("$(REDIS_PASSWORD)", password)
    return re.sub(r"@dn-dicom-node-redis:6379/", f"@127.0.0.1:{port}/", url)


def _queue_app(broker_url: str) -> Celery:
    """A Celery app with the node's broker transport options (its priority steps)."""
    app = Celery("chart-test", broker=broker_url)
    app.conf.broker_transport_options = dict(node_app.conf.broker_transport_options)
    app.conf.task_default_queue = "io"
    return app


def test_bundled_redis_url_connects_with_the_password(redis_with_password):
    port, password, docs = redis_with_password
    broker = _rendered_url(docs, "DICOM_NODE_BROKER_URL", password, port)
    result = _rendered_url(docs, "DICOM_NODE_RESULT_BACKEND", password, port)
    assert redis_client.Redis.from_url(broker).ping() and redis_client.Redis.from_url(result).ping()
    assert redis_client.Redis.from_url(result).connection_pool.connection_kwargs["db"] == 1
    with pytest.raises(redis_client.AuthenticationError):  # without the password: refused
        redis_client.Redis(host="127.0.0.1", port=port).ping()
    with _queue_app(broker).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)


@pytest.mark.parametrize("queue", ["io", "gpu"])
def test_keda_triggers_count_every_priority_list_of_the_queue(redis_with_password, queue):
    port, password, _ = redis_with_password
    docs = render(value_sets()["autoscaling-keda"])
    scaled = find(docs, "ScaledObject", f"-worker-{queue}")
    triggers = scaled["spec"]["triggers"]
    lists = [t["metadata"]["listName"] for t in triggers]
    assert scaled["spec"]["scaleTargetRef"]["name"] == f"dn-dicom-node-worker-{queue}"
    # The formula sums every trigger (KEDA would otherwise take the largest one).
    assert scaled["spec"]["advanced"]["scalingModifiers"]["formula"] == " + ".join(t["name"] for t in triggers)
    assert all(t["metadata"]["databaseIndex"] == "0" for t in triggers)
    assert all(t["authenticationRef"]["name"] == "dn-dicom-node-redis" for t in triggers)
    auth = find(docs, "TriggerAuthentication", "-redis")["spec"]["secretTargetRef"]
    assert auth == [{"parameter": "password", "name": "dn-dicom-node-credentials", "key": "redis-password"}]

    # Messages published as the node publishes them, at every priority it uses and more.
    broker = _rendered_url(render({}), "DICOM_NODE_BROKER_URL", password, port)
    app = _queue_app(broker)
    priorities = list(range(10)) * 3
    for priority in priorities:
        app.send_task("dicom_node.pipeline.tasks.chart_probe", queue=queue, priority=priority)
    client = redis_client.Redis.from_url(broker)
    counted = sum(client.llen(name) for name in lists)
    assert counted == len(priorities)
    # Every list Celery made for this queue is one the triggers read.
    made = {key.decode() for key in client.keys(f"{queue}*")}
    assert made <= set(lists) and len(made) > 1


def test_the_redis_probes_authenticate(redis_with_password):
    # The probe runs redis-cli with REDISCLI_AUTH from the Secret, as the chart's container does.
    import os

    port, password, docs = redis_with_password
    c = find(docs, "Deployment", "-redis")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in c["env"]} == {"REDIS_PASSWORD", "REDISCLI_AUTH"}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        chart = probe["exec"]["command"]
        assert chart == ["redis-cli", "ping"]  # in the pod: 127.0.0.1:6379; here: the test's port
        command = [chart[0], "-p", str(port), *chart[1:]]
        ok = subprocess.run(command, env={**os.environ, "REDISCLI_AUTH": password}, capture_output=True, text=True, timeout=10)
        assert ok.stdout.strip() == "PONG"
        refused = subprocess.run(command, env={k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"},
                                 capture_output=True, text=True, timeout=10)
        assert "NOAUTH" in refused.stdout + refused.stderr
