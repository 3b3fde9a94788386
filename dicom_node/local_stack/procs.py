"""Process helpers: free ports, waiting for a listener, stopping a child cleanly."""

from __future__ import annotations

import functools
import random
import socket
import subprocess
import time
from pathlib import Path


# Ports are chosen below the kernel's ephemeral range: a port from that range can be handed to
# any outgoing connection (as its local port) between a listener's stop and its restart on the
# same port, and the restart then fails with "Address already in use".
LOWEST_PORT = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


@functools.cache
def ephemeral_start() -> int | None:
    """The first port of the kernel's ephemeral range; None when unknown, or too low to leave
    ports between LOWEST_PORT and it."""
    try:
        start = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return start if start > LOWEST_PORT + 1000 else None


def free_port() -> int:
    """A loopback TCP port that is free now, not handed out before by this process, and below
    the ephemeral range where the kernel leaves room for it (else one the kernel picks)."""
    start = ephemeral_start()
    for _ in range(200):
        port = _bind_once(0 if start is None else random.randrange(LOWEST_PORT, start))
        if port is not None and port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port found")


def _bind_once(port: int) -> int | None:
    """The port a socket bound to `port` got (0: the kernel's pick); None when it is taken."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
