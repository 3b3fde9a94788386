"""Several SCP processes on one port (`scp_processes`): C-STORE work spread over CPU cores.

pynetdicom is pure Python and one process runs one thread at a time, so the associations of one
SCP process share one core. With `scp_processes` N > 1, `dicom-node serve` (the first process:
listeners, study assembler, pipeline coordinator, HTTP service) starts N - 1 more processes
(`dicom-node scp-listener`), each with its own application entity, front door and index
connection, all bound to the same port with SO_REUSEPORT; the kernel hands each new connection
to one of them. They die with the first process (PR_SET_PDEATHSIG), so a kill -9 of `serve`
leaves nothing listening. The front door's limits (max_associations, max_connections_per_host)
count for the whole node: the first process keeps the counts and each extra process asks it over
a socket pair of its own (connection_counts.py).
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import threading

from .config import Settings
from .connection_counts import ConnectionCounts, RemoteCounts, serve_counts

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_listeners(settings: Settings, counts: ConnectionCounts) -> list[subprocess.Popen]:
    """The extra SCP processes (same environment, so the same settings), each asking `counts`."""
    processes = []
    for number in range(2, settings.scp_processes + 1):
        ours, theirs = socket.socketpair()
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "scp-listener", "--counts-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                preexec_fn=_die_with_parent,
            )
        serve_counts(counts, ours, owner=f"scp-process-{number}")
        processes.append(process)
    return processes


def stop_listeners(processes: list[subprocess.Popen], timeout: float = 10.0) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_listener(settings: Settings, counts_fd: int) -> None:
    """One extra SCP process, until SIGTERM; `counts_fd`: its end of the link to the first one."""
    from .scp import DicomNode
    from .startup import freeze_startup_heap

    node = DicomNode(settings, listener_only=True, counts=RemoteCounts(socket.socket(fileno=counts_fd)))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node.start()
    freeze_startup_heap()
    stop.wait()
    node.stop()
