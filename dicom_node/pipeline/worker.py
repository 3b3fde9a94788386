"""The worker process: Celery run with an honest exit status, a liveness heartbeat, its check,
and a restart wrapper for hosts without a supervisor (the quickstart).

Liveness. A worker that lost Redis keeps retrying (``broker_connection_max_retries=None``), so
"is the broker reachable" (Celery's ping) is the wrong question: it would restart every healthy
worker during a broker outage, and it cannot be answered at all while Redis is down. The
question is "is this worker's consumer making progress", answered by a file, not the broker or
the database:

* A consumer bootstep (:class:`Liveness`) registers a timer on the consumer's event loop each
  time the consumer starts consuming; a tick proves the loop is turning.
* While the consumer reconnects (the loop is not running), each new connection attempt and
  each consumer restart counts as progress instead.
* A daemon thread rewrites ``<worker_heartbeat_dir>/<worker name>`` every
  ``worker_heartbeat_seconds`` with the time of the last progress, and stops rewriting it once
  there has been none for ``worker_heartbeat_max_age_seconds``: a consumer stuck on a socket or
  a lock, or a process that is frozen, goes stale; one consuming or retrying the broker does not.
* ``dicom-node worker-alive`` (:func:`check_heartbeat`) exits 0 when the last progress is
  younger than the maximum age and the worker process still exists, 1 otherwise.

Exit status. ``Celery.worker_main`` drops the worker's exit code (``celery.main`` returns it in
non-standalone mode and ``Celery.start`` ignores it), so an "Unrecoverable error" exits 0.
:func:`run_worker` returns it, and ``dicom-node worker`` exits with it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from celery import bootsteps

from ..config import Settings
from ..logs import log_event

log = logging.getLogger(__name__)

_CONF_KEY = "dicom_node_liveness"  # our own key in app.conf: where the bootstep finds its settings


def heartbeat_dir(settings: Settings) -> Path:
    return Path(settings.worker_heartbeat_dir or Path(settings.work_dir) / "heartbeats")


def node_name(hostname: str | None) -> str:
    """The Celery node name a worker gets for `--hostname` (``%h``, ``%n``, ``%d`` expanded)."""
    from celery.utils.nodenames import default_nodename, host_format

    return host_format(default_nodename(hostname))


def heartbeat_path(settings: Settings, hostname: str | None) -> Path:
    return heartbeat_dir(settings) / node_name(hostname)


# --- the heartbeat, inside the worker ----------------------------------------------------------


class HeartbeatWriter:
    """Rewrites the heartbeat file from a thread, as long as the consumer shows progress."""

    def __init__(self, consumer, path: Path, interval: float, max_age: float) -> None:
        self.consumer = consumer
        self.path = path
        self.interval = interval
        self.max_age = max_age
        self.ticks = 0  # incremented on the consumer's event loop
        self.last_tick = 0.0
        self.progress_at = time.monotonic()  # the worker is starting: that is progress
        self._seen: tuple | None = None
        self.stopping = False
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicom-node-heartbeat", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        atexit.register(self.stop)

    def tick(self) -> None:
        """Called on the consumer's event loop: the loop is turning."""
        self.ticks += 1
        self.last_tick = time.monotonic()

    def draining(self) -> None:
        """The consumer has shut down and the pool finishes its tasks (warm shutdown): still alive,
        so a probe does not kill a worker finishing a long comparison."""
        self.stopping = True

    def stop(self) -> None:
        """At process exit: a clean exit leaves no heartbeat behind."""
        if os.getpid() != self.pid:  # a forked pool process exiting: not ours to remove
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 1)
        self.path.unlink(missing_ok=True)

    def state(self, now: float) -> str:
        if self.stopping:
            return "stopping"
        connected = getattr(self.consumer, "connection", None) is not None
        return "consuming" if connected and now - self.last_tick <= 2 * self.interval + 1 else "connecting"

    def observe(self, now: float) -> None:
        # Progress: a loop tick, a new connection attempt, or a consumer restart.
        seen = (self.ticks, getattr(self.consumer, "broker_connection_retry_attempt", 0),
                getattr(self.consumer, "restart_count", 0))
        if seen != self._seen or self.stopping:
            self._seen = seen
            self.progress_at = now

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self.observe(now)
            if now - self.progress_at <= self.max_age:
                try:
                    self.write(now)
                except OSError as exc:  # a full or read-only disk must not kill the worker
                    log_event(log, logging.WARNING, "worker.heartbeat_failed", path=str(self.path), reason=str(exc))
            self._stop.wait(self.interval)

    def write(self, now: float) -> None:
        wall = time.time()
        record = {
            "worker": getattr(self.consumer, "hostname", self.path.name),
            "host": socket.gethostname(),
            "pid": self.pid,
            "state": self.state(now),
            "progress_at": wall - (now - self.progress_at),
            "written_at": wall,
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)  # a reader never sees half a file


class Liveness(bootsteps.StartStopStep):
    """Consumer bootstep: the heartbeat thread, fed by a timer on the consumer's event loop."""

    requires = ("celery.worker.consumer.tasks:Tasks",)  # ticks only once tasks are being consumed

    def __init__(self, c, **kwargs) -> None:
        super().__init__(c, **kwargs)
        conf = c.app.conf.get(_CONF_KEY) or {}
        self.writer: HeartbeatWriter | None = None
        self.entry = None
        if conf:
            self.writer = HeartbeatWriter(c, Path(conf["dir"]) / c.hostname, conf["interval"], conf["max_age"])
            self.writer.start()

    def start(self, c) -> None:
        if self.writer is None:
            return
        self.writer.tick()
        # A timer added after the connection belongs to it: Celery cancels it on connection loss,
        # and this step adds a new one when the consumer starts again.
        self.entry = c.timer.call_repeatedly(self.writer.interval, self.writer.tick)

    def stop(self, c) -> None:
        if self.entry is not None:
            self.entry.cancel()
            self.entry = None

    def shutdown(self, c) -> None:
        self.stop(c)
        if self.writer is not None:
            self.writer.draining()  # the file goes when the process exits (atexit), or stale if killed


def install_liveness(celery_app, settings: Settings) -> None:
    celery_app.conf[_CONF_KEY] = {
        "dir": str(heartbeat_dir(settings)),
        "interval": settings.worker_heartbeat_seconds,
        "max_age": settings.worker_heartbeat_max_age_seconds,
    }
    if Liveness not in celery_app.steps["consumer"]:
        celery_app.steps["consumer"].add(Liveness)


def run_worker(celery_app, argv: list[str]) -> int:
    """`celery worker` in this process; returns the worker's exit status (which worker_main drops)."""
    import click
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = celery_app  # what Celery.start does
    try:
        code = celery_command.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    finally:
        celery_command.params[0].default = None
    return code if isinstance(code, int) else 0


# --- the check --------------------------------------------------------------------------------


@dataclass
class Alive:
    ok: bool
    message: str


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_heartbeat(path: Path, max_age: float, now: float | None = None) -> Alive:
    """Is the worker whose heartbeat is `path` alive: progress within `max_age` seconds, and (on
    this host) its process still there."""
    now = time.time() if now is None else now
    try:
        record = json.loads(path.read_text())
        progress_at = float(record["progress_at"])
    except FileNotFoundError:
        return Alive(False, f"no heartbeat at {path}: the worker has not started consuming, or it stopped")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Alive(False, f"unreadable heartbeat {path}: {exc}")
    worker = record.get("worker", path.name)
    age = now - progress_at
    if age > max_age:
        return Alive(False, f"{worker}: stale, last progress {age:.0f} s ago (more than {max_age:g} s; "
                            f"state {record.get('state')}, pid {record.get('pid')}): the consumer is stuck or gone")
    pid = record.get("pid")
    if record.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_exists(pid):
        return Alive(False, f"{worker}: process {pid} is gone (last progress {age:.0f} s ago)")
    return Alive(True, f"{worker}: alive, {record.get('state')}, last progress {age:.0f} s ago (pid {pid})")


def heartbeats_for_this_host(directory: Path) -> list[Path]:
    """The heartbeat files of workers named ``...@<this host name>`` (the default node names)."""
    suffix = "@" + socket.gethostname()
    return sorted(p for p in directory.glob("*@*") if p.name.endswith(suffix) and not p.name.startswith("."))


# --- the restart wrapper ----------------------------------------------------------------------


def supervise(command: list[str], heartbeat: Path, max_age: float, poll: float = 1.0,
              backoff_start: float = 1.0, backoff_max: float = 30.0) -> int:
    """Run `command` (a ``dicom-node worker`` without ``--restart-on-exit``) and run it again
    when it exits non-zero, or when its heartbeat goes stale (it is killed first); with
    exponential backoff (reset after a run that lasted a minute). SIGTERM/SIGINT are passed to
    the worker (a warm shutdown) and end the loop; returns the worker's last exit status.

    The worker stays in this process's group, so killing the group (a crash) takes both; if
    this process dies anyway, the worker gets SIGTERM (Linux parent-death signal)."""
    stopping = threading.Event()
    child: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = backoff_start
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command, preexec_fn=_die_with_parent)
        log_event(log, logging.INFO, "worker.started", pid=child.pid, heartbeat=str(heartbeat))
        stale = None
        while child.poll() is None:
            try:
                child.wait(poll)
            except subprocess.TimeoutExpired:
                pass
            if child.poll() is not None or stopping.is_set():
                continue
            if time.monotonic() - started > max_age and not _fresh_heartbeat_of(child.pid, heartbeat, max_age):
                stale = check_heartbeat(heartbeat, max_age).message
                log_event(log, logging.ERROR, "worker.stale", pid=child.pid, reason=stale)
                child.kill()
                child.wait()
        code = child.returncode if child.returncode >= 0 else 128 - child.returncode  # killed by a signal: 128+N
        if stopping.is_set() or (code == 0 and stale is None):
            return code
        if time.monotonic() - started > 60:
            backoff = backoff_start
        log_event(log, logging.ERROR, "worker.exited", pid=child.pid, returncode=code,
                  restart_in=backoff, reason=stale or f"exit status {code}")
        if stopping.wait(backoff):
            return code
        backoff = min(backoff * 2, backoff_max)


def _fresh_heartbeat_of(pid: int, heartbeat: Path, max_age: float) -> bool:
    try:
        record = json.loads(heartbeat.read_text())
    except (OSError, ValueError):
        return False
    return record.get("pid") == pid and check_heartbeat(heartbeat, max_age).ok


def _die_with_parent() -> None:
    """In the worker child: SIGTERM when the wrapper dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def worker_command(argv: list[str]) -> list[str]:
    """This interpreter running ``dicom-node`` with `argv`."""
    return [sys.executable, "-m", "dicom_node", *argv]
