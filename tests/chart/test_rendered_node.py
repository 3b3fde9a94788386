"""The node and an io worker run with exactly the environment the chart renders for them (the
pod's paths moved under a temporary directory, the Services' names to loopback ports), against a
real Redis with the chart's generated password. The chart's own `helm test` script then passes
against the running node, and the workers' exec probe says alive."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.local_stack.procs import free_port, stop, wait_for_port

from .env import container_env
from .helm import find, render

pytestmark = pytest.mark.integration
DICOM_NODE = str(Path(sys.executable).parent / "dicom-node")


def _pod_paths(tmp: Path) -> dict[str, str]:
    return {"/etc/dicom-node/secrets": str(tmp / "secrets"), "/data": str(tmp / "data"), "/tmp": str(tmp / "podtmp"),
            "/models": str(tmp / "models")}


def _localised(env: dict[str, str], tmp: Path, ports: dict[str, int]) -> dict[str, str]:
    out = {}
    for name, value in env.items():
        for pod_path, local in _pod_paths(tmp).items():
            if value == pod_path or value.startswith(pod_path + "/"):
                value = local + value[len(pod_path):]
                break
            if value.startswith("sqlite:///" + pod_path + "/"):
                value = "sqlite:///" + local + value[len("sqlite:///" + pod_path):]
                break
        value = value.replace("@dn-dicom-node-redis:6379/", f"@127.0.0.1:{ports['redis']}/")
        out[name] = value
    # Loopback instead of 0.0.0.0 on a developer's machine; the ports are free ones.
    out.update(DICOM_NODE_HOST="127.0.0.1", DICOM_NODE_HTTP_HOST="127.0.0.1",
               DICOM_NODE_PORT=str(ports["dicom"]), DICOM_NODE_HTTP_PORT=str(ports["http"]))
    return out


@pytest.fixture(scope="module")
def chart_stack(tmp_path_factory):
    """One node and one io worker for the module's tests (they only read)."""
    tmp_path = tmp_path_factory.mktemp("chart-stack")
    docs = render({})
    secret = {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", "-credentials")["data"].items()}
    for path in _pod_paths(tmp_path).values():
        Path(path).mkdir(parents=True)
    # The projected Secret volume, as the kubelet writes it.
    (tmp_path / "secrets" / "http-token").write_text(secret["http-token"])
    (tmp_path / "secrets" / "pseudonym-key").write_text(secret["pseudonym-key"])
    ports = {"redis": free_port(), "dicom": free_port(), "http": free_port()}
    procs = []
    redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(ports["redis"]), "--save", "",
                              "--dir", str(tmp_path), "--requirepass", secret["redis-password"]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(redis)
    try:
        wait_for_port(ports["redis"], proc=redis)
        envs = {}
        for component in ("node", "worker-io"):
            c = find(docs, "Deployment", f"-{component}")["spec"]["template"]["spec"]["containers"][0]
            clean = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
            envs[component] = {**clean, **_localised(container_env(docs, c), tmp_path, ports)}
            log = open(tmp_path / f"{component}.log", "wb")
            procs.append(subprocess.Popen([DICOM_NODE, *c["args"]], env=envs[component], stdout=log, stderr=subprocess.STDOUT,
                                          cwd=tmp_path))
        wait_for_port(ports["http"], timeout=60, proc=procs[1])
        yield docs, ports, envs, tmp_path
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_the_chart_test_passes_against_a_node_run_with_the_chart_environment(chart_stack):
    docs, ports, envs, tmp_path = chart_stack
    script = find(docs, "Pod", "-test")["spec"]["containers"][0]["args"][0]
    script = (script.replace("http://dn-dicom-node-http:8080", f"http://127.0.0.1:{ports['http']}")
              .replace('("dn-dicom-node-dicom", 11112)', f'("127.0.0.1", {ports["dicom"]})')
              .replace("/etc/dicom-node/secrets", str(tmp_path / "secrets")))
    deadline = time.monotonic() + 60
    while True:  # /readyz turns ready once the index, the storage and the broker answer
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "node.log").read_text()[-3000:]
    assert result.stdout.splitlines() == ["ok   /readyz", "ok   /status without token refused", "ok   /status with token",
                                          "ok   DICOM port accepts connections"]


def test_the_worker_probe_says_alive_with_the_chart_environment(chart_stack):
    docs, ports, envs, tmp_path = chart_stack
    probe = find(docs, "Deployment", "-worker-io")["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["command"]
    assert probe == ["dicom-node", "worker-alive"]
    deadline = time.monotonic() + 60
    while True:
        result = subprocess.run([DICOM_NODE, *probe[1:]], env=envs["worker-io"], capture_output=True, text=True, timeout=30)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "worker-io.log").read_text()[-3000:]
    assert list((tmp_path / "podtmp" / "heartbeats").iterdir()), "the heartbeat is on the pod's /tmp"


def test_the_served_gpu_queue_worker_keeps_max_concurrency_requests_in_flight(tmp_path):
    # With an external endpoint the chart runs the gpu-queue worker as a thin thread-pool worker;
    # the args it renders must leave it vlm_max_concurrency threads (what lets the server batch).
    from .value_sets import merged, value_sets

    docs = render(merged(value_sets()["external-model-endpoint"], {"vlm": {"maxConcurrency": 6}}))
    secret = {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", "-credentials")["data"].items()}
    for path in _pod_paths(tmp_path).values():
        Path(path).mkdir(parents=True)
    (tmp_path / "secrets" / "http-token").write_text(secret["http-token"])
    (tmp_path / "secrets" / "pseudonym-key").write_text(secret["pseudonym-key"])
    (tmp_path / "secrets" / "vlm-api-key").write_text("sk-test-0123456789")
    ports = {"redis": free_port(), "dicom": free_port(), "http": free_port()}
    redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(ports["redis"]), "--save", "",
                              "--dir", str(tmp_path), "--requirepass", secret["redis-password"]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = find(docs, "Deployment", "-worker-gpu")["spec"]["template"]["spec"]["containers"][0]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env = {**clean, **_localised(container_env(docs, c), tmp_path, ports)}
    log_path = tmp_path / "worker-gpu.log"
    worker = None
    try:
        wait_for_port(ports["redis"], proc=redis)
        worker = subprocess.Popen([DICOM_NODE, *c["args"]], env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                                  cwd=tmp_path)
        deadline = time.monotonic() + 60
        while "concurrency:" not in log_path.read_text() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(1)
        log = log_path.read_text()
        assert "concurrency: 6 (thread)" in log, log[-3000:]
    finally:
        if worker is not None:
            stop(worker)
        stop(redis)


def test_several_scp_replicas_with_the_chart_postgresql_environment(tmp_path, postgres_server):
    # placement multiNode, node.replicas 3, the index URL from an existing Secret: SCP replicas
    # started at once on one real PostgreSQL and one shared volume all become ready, and exactly
    # one of them coordinates the pipeline. Two of the three run here (2 cores).
    import urllib.error
    import urllib.request

    import sqlalchemy

    from .value_sets import merged, value_sets

    # Without the site's PACS (unreachable here: /readyz would rightly say not ready).
    docs = render(merged(value_sets()["postgres-existing-secret"], {"priors": {"archives": []}}))
    deployment = find(docs, "Deployment", "-node")
    assert deployment["spec"]["replicas"] == 3
    database = postgres_server.create_database()
    url = postgres_server.url(database)
    secret = {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", "-credentials")["data"].items()}
    for path in _pod_paths(tmp_path).values():
        Path(path).mkdir(parents=True)
    (tmp_path / "secrets" / "http-token").write_text(secret["http-token"])
    (tmp_path / "secrets" / "pseudonym-key").write_text(secret["pseudonym-key"])
    redis_port = free_port()
    procs = [subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                               "--dir", str(tmp_path), "--requirepass", secret["redis-password"]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    rendered = container_env(docs, c)
    assert rendered["DICOM_NODE_DATABASE_URL"].startswith("postgresql+psycopg://")  # from the Secret
    http_ports = []
    try:
        wait_for_port(redis_port, proc=procs[0])
        for replica in range(2):
            ports = {"redis": redis_port, "dicom": free_port(), "http": free_port()}
            http_ports.append(ports["http"])
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")},
                   **_localised(rendered, tmp_path, ports), "DICOM_NODE_DATABASE_URL": url}
            procs.append(subprocess.Popen([DICOM_NODE, *c["args"]], env=env, cwd=tmp_path,
                                          stdout=open(tmp_path / f"node-{replica}.log", "wb"), stderr=subprocess.STDOUT))
        for port, proc in zip(http_ports, procs[1:]):
            wait_for_port(port, timeout=90, proc=proc)
        deadline = time.monotonic() + 60
        ready, last = set(), {}
        while len(ready) < 2 and time.monotonic() < deadline:
            for port in http_ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
                        ready.add(port)
                except urllib.error.HTTPError as exc:
                    last[port] = exc.read().decode()[:1000]
                except OSError as exc:
                    last[port] = str(exc)
            time.sleep(1)
        assert len(ready) == 2, last
        engine = sqlalchemy.create_engine(url)
        deadline = time.monotonic() + 30
        while True:
            with engine.connect() as conn:
                owners = conn.execute(sqlalchemy.text("SELECT owner FROM leases WHERE name = 'pipeline-coordinator' "
                                                      "AND until > extract(epoch from now())")).scalars().all()
            if owners or time.monotonic() > deadline:
                break
            time.sleep(1)
        engine.dispose()
        assert len(owners) == 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        postgres_server.drop_database(database)
