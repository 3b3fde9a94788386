"""Several SCP processes on one port (`scp_processes`): C-STORE work spread over CPU cores.

pynetdicom is pure Python and one process runs one thread at a time, so the associations of one
SCP process share one core. With `scp_processes` N > 1, `dicom-node serve` (the first process:
listeners, study assembler, pipeline coordinator, HTTP service) starts N - 1 more processes
(`dicom-node scp-listener`), each with its own application entity, front door and index
connection. The first process accepts every connection and serves it itself or passes it to
the extra process holding the fewest (connection_handoff.py). They die with the first process
(PR_SET_PDEATHSIG), so a kill -9 of `serve` leaves nothing serving; the first process starts
again one that exits on its own. The front door's limits (max_associations,
max_connections_per_host) count for the whole node: the first process keeps the counts and each
extra process releases and claims through a socket pair of its own (connection_counts.py).
Their counters go into prometheus_client's multiprocess folder, so /metrics counts all of them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .config import Settings
from .connection_counts import ConnectionCounts, RemoteCounts, serve_counts
from .connection_handoff import Handoff, link_pair
from .incoming_owner import remove_leftovers
from .logs import log_event
from .storage import INCOMING

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: no dlopen between fork and exec


def _die_with_parent() -> None:
    """Runs in the child between fork and exec. The "parent" is the thread that started it: each
    supervising thread lives until the process it started has ended."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


RESTART_DELAY = 1.0  # seconds before an extra process that exited is started again; doubles to
MAX_RESTART_DELAY = 30.0  # while it keeps exiting within STABLE_SECONDS of its start
STABLE_SECONDS = 60.0
DRAIN_SECONDS = 300.0  # an extra process whose link failed waits this long for its associations to end


def share_metrics() -> Path:
    """Counters summed over all SCP processes (prometheus_client's multiprocess mode): a fresh
    folder named in the environment, which the extra processes inherit. Call before
    prometheus_client is imported; http_api.exposition_registry then reads every process's."""
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


class ExtraListeners:
    """The extra SCP processes (same environment, so the same settings), each passed connections
    through `handoff` once ready and asking `counts`; one that exits on its own (a crash, the
    OOM killer) is started again, and what it held in `counts` is freed."""

    def __init__(self, settings: Settings, counts: ConnectionCounts, handoff: Handoff) -> None:
        self.settings = settings
        self.counts = counts
        self.handoff = handoff
        self._processes: dict[int, subprocess.Popen] = {}
        self._owners: dict[int, str] = {}  # process number -> the owner name of its current start
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        for number in range(2, self.settings.scp_processes + 1):
            thread = threading.Thread(target=self._supervise, args=(number,), name=f"scp-process-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _spawn(self, owner: str, number: int) -> tuple[subprocess.Popen, socket.socket] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            counts_ours, counts_theirs = socket.socketpair()
            passing_ours, passing_theirs = link_pair()
            with counts_theirs, passing_theirs:
                try:
                    process = subprocess.Popen(
                        [sys.executable, "-m", "dicom_node", "scp-listener", "--counts-fd", str(counts_theirs.fileno()),
                         "--connections-fd", str(passing_theirs.fileno())],
                        pass_fds=(counts_theirs.fileno(), passing_theirs.fileno()),
                        preexec_fn=_die_with_parent,
                    )
                except OSError:
                    counts_ours.close()
                    passing_ours.close()
                    raise
            serve_counts(self.counts, counts_ours, owner=owner)
            self._processes[number] = process
            self._owners[number] = owner
            return process, passing_ours

    def _supervise(self, number: int) -> None:
        delay, generation = RESTART_DELAY, 0
        while True:
            generation += 1
            started = time.monotonic()
            owner = f"scp-process-{number}.{generation}"  # one per start: never counted again once gone
            try:
                started_process = self._spawn(owner, number)
            except OSError as exc:  # e.g. out of processes or memory: try again later
                log_event(log, logging.ERROR, "scp.process_start_failed", process=number, error=str(exc),
                          restart_in_seconds=delay)
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, MAX_RESTART_DELAY)
                continue
            if started_process is None:
                return
            process, passing = started_process
            if self.handoff.wait_ready(owner, passing):
                with self._lock:  # not once stop() has begun: it dropped the links already
                    ready = not self._stopping.is_set()
                    if ready:
                        self.counts.join(owner)
                if ready:
                    log_event(log, logging.INFO, "scp.process_ready", process=number, pid=process.pid)
            code = process.wait()
            self.handoff.remove(owner)
            self.counts.forget(owner)  # also what was passed to it after its counts link closed
            remove_leftovers(Path(self.settings.storage_dir) / INCOMING)  # its half-received files
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_SECONDS:
                delay = RESTART_DELAY
            log_event(log, logging.ERROR, "scp.process_exited", process=number, pid=process.pid, exit_code=code,
                      restart_in_seconds=delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, MAX_RESTART_DELAY)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping.set()
            processes = list(self._processes.values())
            owners = list(self._owners.values())
        for owner in owners:  # what arrives meanwhile is served by the first process
            self.counts.leave(owner)
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in self._threads:
            thread.join(timeout)


def run_listener(settings: Settings, counts_fd: int, connections_fd: int) -> None:
    """One extra SCP process, until SIGTERM; `counts_fd`, `connections_fd`: its ends of the links
    to the first one (the counts; the connections passed to it)."""
    from .scp import DicomNode
    from .startup import freeze_startup_heap

    stop, link_lost, terminating = threading.Event(), threading.Event(), threading.Event()

    def lose_link() -> None:  # a link to the first process failed: end, to be started again
        link_lost.set()
        stop.set()

    def terminate(*_) -> None:
        terminating.set()
        stop.set()

    node = DicomNode(settings, listener_only=True,
                     counts=RemoteCounts(socket.socket(fileno=counts_fd), on_failure=lose_link),
                     passed_connections=socket.socket(fileno=connections_fd), on_link_lost=lose_link)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    node.start()
    freeze_startup_heap()
    stop.wait()
    if link_lost.is_set():
        # Nothing new comes in any more; let the associations in progress finish first.
        deadline = time.monotonic() + DRAIN_SECONDS
        while node.ae.active_associations and not terminating.is_set() and time.monotonic() < deadline:
            time.sleep(0.5)
    node.stop()
    if link_lost.is_set() and not terminating.is_set():
        log_event(log, logging.ERROR, "scp.process_lost_its_link", pid=os.getpid())
        sys.exit(1)
