"""Workers outlive the broker: a real redis-server killed -9 and restarted on the same port under
a real `dicom-node worker` process; the worker's liveness check; its exit status and restarts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from dicom_node import patches
from dicom_node.local_stack.procs import free_port
from dicom_node.pipeline.worker import HeartbeatWriter, check_heartbeat
from tests.support.procs import REPO
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

WORKER = f"io1@{socket.gethostname()}"


@pytest.fixture
def broker(tmp_path):
    redis = RedisServer(tmp_path / "redis", port=free_port()).start()
    yield redis
    if redis.proc is not None:
        redis.stop()


def kill9(redis: RedisServer) -> None:
    redis.proc.kill()
    redis.proc.wait()
    redis.proc = None


def worker_env(tmp_path: Path, redis: RedisServer, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DICOM_NODE_BROKER_URL=f"redis://127.0.0.1:{redis.port}/0",
        DICOM_NODE_RESULT_BACKEND=f"redis://127.0.0.1:{redis.port}/1",
        DICOM_NODE_DATABASE_URL=f"sqlite:///{tmp_path / 'index.db'}",
        DICOM_NODE_WORK_DIR=str(tmp_path / "jobs"),
        DICOM_NODE_STORAGE_DIR=str(tmp_path / "store"),
        DICOM_NODE_LOG_FORMAT="text",
        DICOM_NODE_WORKER_HEARTBEAT_SECONDS="0.5",
        DICOM_NODE_WORKER_HEARTBEAT_MAX_AGE_SECONDS="15",
        TCP_NODELAY="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def start_worker(tmp_path, broker):
    started: list[subprocess.Popen] = []

    def start(module: str = "dicom_node", **extra_env: str) -> subprocess.Popen:
        log = open(tmp_path / "worker.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "worker", "--queues", "io", "-c", "1", "--hostname", "io1@%h"],
            env=worker_env(tmp_path, broker, **extra_env), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def worker_alive(tmp_path: Path, redis: RedisServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", "worker-alive", *args], capture_output=True, text=True,
                          cwd=REPO, env=worker_env(tmp_path, redis), timeout=60)


def client(redis: RedisServer) -> Celery:
    """A publisher of its own (the pipeline's app is a module global other tests configure)."""
    app = Celery("outage-client", broker=f"redis://127.0.0.1:{redis.port}/0", backend=f"redis://127.0.0.1:{redis.port}/1")
    app.conf.update(broker_transport_options={"priority_steps": list(range(10)), "queue_order_strategy": "priority"},
                    broker_connection_retry_on_startup=True)
    return app


def wait_consuming(tmp_path: Path, redis: RedisServer, timeout: float = 90) -> None:
    wait_until(lambda: worker_alive(tmp_path, redis, "--hostname", "io1@%h").returncode == 0, timeout, 0.5,
               "the worker's heartbeat")
    wait_until(lambda: "consuming" in (tmp_path / "jobs" / "heartbeats" / WORKER).read_text(), 30, 0.2,
               "the worker to consume")


def round_trip(app: Celery, timeout: float = 60) -> None:
    """A task published now is consumed and run: celery.accumulate (built in) returns its arguments."""
    assert app.send_task("celery.accumulate", args=[1, 2], queue="io").get(timeout=timeout) == [1, 2]


def answers_ping(app: Celery) -> bool:
    try:
        return bool(app.control.ping([WORKER], timeout=1.0))
    except app.connection_for_write().connection_errors:  # the client's own pooled connection died with Redis
        return False


def log_of(tmp_path: Path) -> str:
    return (tmp_path / "worker.log").read_text(errors="replace")


def test_worker_outlives_redis_killed_while_idle(tmp_path, broker, start_worker):
    worker = start_worker()
    wait_consuming(tmp_path, broker)
    app = client(broker)
    round_trip(app)

    kill9(broker)
    time.sleep(1)
    # Redis is down: the worker is reconnecting, which is alive (a ping would fail here).
    alive = worker_alive(tmp_path, broker)
    assert alive.returncode == 0, alive.stderr
    time.sleep(1)
    broker.start()  # same port, replays its AOF
    assert worker.poll() is None

    for outage in (3.0, 1.0):  # again, a longer and a shorter one
        wait_until(lambda: answers_ping(app), 60, 0.5, "the worker answering a ping")
        kill9(broker)
        time.sleep(outage)
        assert worker.poll() is None, log_of(tmp_path)[-3000:]
        broker.start()

    round_trip(app)  # published after the last restart: consumed
    assert worker.poll() is None
    alive = worker_alive(tmp_path, broker, "--hostname", "io1@%h")
    assert alive.returncode == 0, alive.stderr
    assert "consuming" in alive.stdout
    assert "Unrecoverable error" not in log_of(tmp_path)


def test_worker_outlives_redis_killed_mid_task(tmp_path, broker, start_worker):
    """The chaos-run failure: a task in flight (acknowledged late) when Redis dies took the worker
    down with AttributeError("'NoneType' object has no attribute 'hostname'") and exit status 0."""
    worker = start_worker("tests.support.sleepy_worker")
    wait_consuming(tmp_path, broker)
    app = client(broker)
    task = app.send_task("tests.sleep", args=[5], queue="io")
    wait_until(lambda: f"tests.sleep[{task.id}] received" in log_of(tmp_path), 30, 0.1, "the task to start")
    time.sleep(0.5)

    kill9(broker)
    time.sleep(2)
    assert worker.poll() is None, log_of(tmp_path)[-3000:]
    broker.start()

    wait_until(lambda: f"tests.sleep[{task.id}] succeeded" in log_of(tmp_path), 30, 0.2, "the task to finish")
    round_trip(client(broker))  # a fresh client: the test's own pooled connections died with Redis (the worker's are under test)
    assert worker.poll() is None
    assert worker_alive(tmp_path, broker).returncode == 0
    log = log_of(tmp_path)
    assert "Unrecoverable error" not in log and "object has no attribute" not in log


def test_what_cannot_be_recovered_exits_non_zero(tmp_path, broker, start_worker):
    worker = start_worker("tests.support.sleepy_worker", TESTS_CRASH_CONSUMER="1")
    assert worker.wait(90) != 0  # Celery's worker_main would have made this 0
    assert "Unrecoverable error" in log_of(tmp_path)
    alive = worker_alive(tmp_path, broker)
    assert alive.returncode == 1
    assert "not alive" in alive.stderr


def test_closing_a_channel_after_collect_with_unacked_messages(broker):
    """The kombu bug itself: Connection.collect() leaves the channel half-closed and detaches the
    transport; close() then restores the unacked message through transport.client (None).
    Patched, that is a connection error, which close() swallows."""
    patches.apply()
    conn = Connection(broker.url)
    connection_errors = conn.connection_errors
    channel = conn.default_channel
    received = []
    work = Queue("outage-work", Exchange("outage-work"), "outage-work")
    # An auto-delete fanout queue, like the worker's pidbox: closing the channel deletes its binding,
    # which fails on the dead broker before the channel is marked closed.
    broadcast = Queue("outage-broadcast", Exchange("outage-broadcast", type="fanout"), auto_delete=True)
    consumer = conn.Consumer([work, broadcast], channel=channel, callbacks=[lambda body, message: received.append(message)], accept=["json"])
    consumer.consume()
    conn.Producer(channel).publish({"n": 1}, exchange="outage-work", routing_key="outage-work", declare=[work])
    conn.drain_events(timeout=5)
    assert len(received) == 1  # not acknowledged
    channel._brpop_start()  # waiting for the next message, as the worker's event loop does
    kill9(broker)
    conn.collect(socket_timeout=1)
    conn.close()  # unpatched: AttributeError: 'NoneType' object has no attribute 'hostname'
    with pytest.raises(connection_errors):
        received[0].ack()  # the broker is gone: a connection error, not an AttributeError


# --- the liveness check ---------------------------------------------------------------------------


def heartbeat(path: Path, progress_age: float, pid: int | None = None, state: str = "consuming") -> Path:
    now = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"worker": path.name, "host": socket.gethostname(), "pid": pid or os.getpid(),
                                "state": state, "progress_at": now - progress_age, "written_at": now}))
    return path


def test_check_heartbeat_fresh_stale_missing_unreadable_gone(tmp_path):
    path = tmp_path / WORKER
    assert not check_heartbeat(path, 60).ok  # never written
    assert check_heartbeat(heartbeat(path, 5), 60).ok
    assert check_heartbeat(heartbeat(path, 5, state="connecting"), 60).ok  # reconnecting to the broker is alive
    stale = check_heartbeat(heartbeat(path, 100), 60)
    assert not stale.ok and "stale" in stale.message
    path.write_text("{half a")
    assert not check_heartbeat(path, 60).ok
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = check_heartbeat(heartbeat(path, 1, pid=gone.pid), 60)
    assert not dead.ok and "gone" in dead.message


class FakeConsumer:
    hostname = WORKER
    connection = object()
    broker_connection_retry_attempt = 0
    restart_count = 1


def test_heartbeat_is_written_only_while_the_consumer_makes_progress(tmp_path):
    consumer = FakeConsumer()
    writer = HeartbeatWriter(consumer, tmp_path / WORKER, interval=0.05, max_age=0.5)
    writer.start()
    try:
        for _ in range(10):  # the event loop turns
            writer.tick()
            time.sleep(0.05)
        assert check_heartbeat(writer.path, 0.5).ok
        assert json.loads(writer.path.read_text())["state"] == "consuming"
        time.sleep(1.0)  # stuck: no tick, no reconnect attempt
        assert not check_heartbeat(writer.path, 0.5).ok
        written = writer.path.stat().st_mtime_ns
        time.sleep(0.2)
        assert writer.path.stat().st_mtime_ns == written  # no longer rewritten
        consumer.connection = None  # the broker is gone: each connection attempt is progress
        for attempt in range(1, 5):
            consumer.broker_connection_retry_attempt = attempt
            time.sleep(0.1)
        assert check_heartbeat(writer.path, 0.5).ok
        assert json.loads(writer.path.read_text())["state"] == "connecting"
    finally:
        writer.stop()
    assert not writer.path.exists()  # a clean exit leaves nothing behind


def test_worker_alive_command(tmp_path):
    env = dict(os.environ, DICOM_NODE_WORKER_HEARTBEAT_DIR=str(tmp_path))

    def alive(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node", "worker-alive", *args], capture_output=True,
                              text=True, cwd=REPO, env=env, timeout=60)

    missing = alive()
    assert missing.returncode == 1 and "no worker heartbeat" in missing.stderr
    heartbeat(tmp_path / WORKER, 3)
    assert alive().returncode == 0
    assert alive("--hostname", "io1@%h").returncode == 0
    heartbeat(tmp_path / WORKER, 300)
    stale = alive("--hostname", "io1@%h")
    assert stale.returncode == 1 and "stale" in stale.stderr
    assert alive("--max-age", "1000").returncode == 0


# --- the restart wrapper (--restart-on-exit) ------------------------------------------------------


def supervised(tmp_path: Path, child: str, max_age: float = 30.0) -> subprocess.Popen:
    code = ("import sys; from pathlib import Path; from dicom_node.pipeline.worker import supervise; "
            f"sys.exit(supervise([sys.executable, '-c', {child!r}], Path({str(tmp_path / 'hb')!r}), {max_age}, "
            "poll=0.1, backoff_start=0.1, backoff_max=0.2))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def runs(tmp_path: Path) -> int:
    path = tmp_path / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_restart_on_exit_restarts_a_worker_that_exits_non_zero(tmp_path):
    proc = supervised(tmp_path, f"open({str(tmp_path / 'runs')!r}, 'a').write('run\\n'); raise SystemExit(3)")
    try:
        wait_until(lambda: runs(tmp_path) >= 3, 30, 0.1, "three runs")
    finally:
        proc.send_signal(signal.SIGTERM)
        # The last run's status: 3, or 128+SIGTERM when the signal reached a run just starting.
        assert proc.wait(10) in (3, 128 + signal.SIGTERM)


def test_restart_on_exit_kills_and_restarts_a_worker_without_heartbeat(tmp_path):
    proc = supervised(tmp_path, f"import time; open({str(tmp_path / 'runs')!r}, 'a').write('run\\n'); time.sleep(600)", max_age=1.0)
    try:
        wait_until(lambda: runs(tmp_path) >= 2, 30, 0.1, "the hung worker restarted")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_restart_on_exit_stops_with_the_worker(tmp_path):
    clean = supervised(tmp_path, f"open({str(tmp_path / 'runs')!r}, 'a').write('run\\n')")
    assert clean.wait(30) == 0 and runs(tmp_path) == 1  # a clean exit is not restarted
    (tmp_path / "runs").unlink()
    child = ("import signal, sys, time; "
             f"open({str(tmp_path / 'runs')!r}, 'a').write('run\\n'); "
             "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); time.sleep(600)")
    proc = supervised(tmp_path, child)
    wait_until(lambda: runs(tmp_path) == 1, 30, 0.1, "the worker started")
    proc.send_signal(signal.SIGTERM)  # passed on: the worker's warm shutdown, then the wrapper exits
    assert proc.wait(10) == 0
    assert runs(tmp_path) == 1
