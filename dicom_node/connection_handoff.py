"""Connections accepted by the first SCP process, served by the least loaded one (scp_processes).

Several processes listening on one port with SO_REUSEPORT leave the spread to the kernel's
hash: 4 connections over 2 processes went 3+1 in 13 of 20 trials, one process then running
three associations on one core while the other idled. So only the first process listens. It
admits each connection to the SCP process holding the fewest (ConnectionCounts.admit) and
passes the socket to an extra one over a socket pair of its own (SCM_RIGHTS), with the name of
the listener that accepted it ("plain" or "tls") and the peer's address. The extra process
serves it as if it had accepted it, TLS handshake included, and releases it through its counts
link when it ends.

Each message is one datagram (SOCK_SEQPACKET) of JSON with one descriptor. An extra process
sends READY once its listeners are built; it is passed nothing before.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable

from .logs import log_event

log = logging.getLogger(__name__)

READY = b"ready"
SEND_TIMEOUT = 5.0  # seconds a hand-off may wait for room in a busy extra process's queue


def link_pair() -> tuple[socket.socket, socket.socket]:
    """(the first process's end, the extra process's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class _Link:
    """One extra process's link; its lock keeps a send and a close from overlapping (a closed
    descriptor's number may be reused at once)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.sock.close()


class Handoff:
    """The first process's side: the extra processes ready to take connections, by owner name."""

    def __init__(self) -> None:
        self._links: dict[str, _Link] = {}
        self._lock = threading.Lock()

    def wait_ready(self, owner: str, link: socket.socket) -> bool:
        """Block until the extra process at `link` is ready, then take it on; False when it
        ended first (its link closed)."""
        try:
            ready = link.recv(len(READY)) == READY
        except OSError:
            ready = False
        if not ready:
            link.close()
            return False
        link.settimeout(SEND_TIMEOUT)
        with self._lock:
            self._links[owner] = _Link(link)
        return True

    def remove(self, owner: str) -> None:
        with self._lock:
            link = self._links.pop(owner, None)
        if link is not None:
            link.close()

    def pass_connection(self, owner: str, connection: socket.socket, listener: str,
                        address: tuple[str, int]) -> bool:
        """Pass `connection` to `owner`; False (and the link dropped) when that fails. The caller
        closes its own descriptor either way."""
        with self._lock:
            link = self._links.get(owner)
        if link is None:
            return False
        message = json.dumps({"listener": listener, "host": address[0], "port": address[1]}).encode()
        try:
            with link.lock:
                socket.send_fds(link.sock, [message], [connection.fileno()])
            return True
        except OSError as exc:  # a closed socket object raises OSError (EBADF) too
            log_event(log, logging.ERROR, "handoff.link_failed", process=owner, error=str(exc) or type(exc).__name__)
            self.remove(owner)
            return False


def receive_connections(link: socket.socket, serve: Callable[[str, socket.socket, tuple[str, int]], None],
                        on_end: Callable[[], None] | None = None) -> threading.Thread:
    """The extra process's side: say READY, then hand each connection passed to `serve`
    (listener name, socket, peer address) until the first process closes the link (it stops,
    or it dropped the link after a failed pass); then `on_end`: the extra process ends, and
    is started again if the first one still runs."""

    def run() -> None:
        try:
            with link:
                link.sendall(READY)
                _receive(link, serve)
        except OSError as exc:
            log_event(log, logging.ERROR, "handoff.link_failed", error=str(exc))
        finally:
            if on_end is not None:
                on_end()

    thread = threading.Thread(target=run, name="handoff-receiver", daemon=True)
    thread.start()
    return thread


def _receive(link: socket.socket, serve: Callable[[str, socket.socket, tuple[str, int]], None]) -> None:
    while True:
        message, fds, _flags, _address = socket.recv_fds(link, 1024, 1)
        if not message and not fds:
            return  # the first process closed the link
        if not fds:
            log_event(log, logging.ERROR, "handoff.bad_message", error="no descriptor", message=message[:200])
            continue
        connection = socket.socket(fileno=fds[0])
        try:
            call = json.loads(message)
            listener, address = str(call["listener"]), (str(call["host"]), int(call["port"]))
        except (ValueError, KeyError, TypeError) as exc:
            log_event(log, logging.ERROR, "handoff.bad_message", error=str(exc), message=message[:200])
            connection.close()
            continue
        try:
            serve(listener, connection, address)
        except Exception as exc:  # noqa: BLE001 - e.g. no thread to be had: drop this one, keep receiving
            log_event(log, logging.ERROR, "handoff.serve_failed", peer=f"{address[0]}:{address[1]}",
                      listener=listener, error=str(exc) or type(exc).__name__)
            connection.close()
