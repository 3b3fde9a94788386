"""The front door's counts (connections per peer address, associations), one set per node.

`max_connections_per_host` and `max_associations` are limits of the node, not of one process:
with `scp_processes` N > 1 counts kept per process would let one host hold N times its share.
So the first process, which accepts every connection, keeps the counts (`ConnectionCounts`):
it admits each connection to the SCP process that holds the fewest (connection_handoff.py
passes it there), and serves the counts to each extra process over a socket pair of its own
(`serve_counts`); an extra process releases its connections and claims its associations
through `RemoteCounts`. When an extra process ends, or is killed, its socket closes and
everything it held is freed.

The protocol is one line per call, in the order made: ``R <host>`` (release a connection),
``C`` (claim an association, answered ``1`` or ``0``), ``U`` (unclaim). It is used once or
twice per connection, never per instance.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from .logs import log_event

log = logging.getLogger(__name__)

LOCAL = "local"  # the owner of what the first process itself holds
ANSWER_TIMEOUT = 10.0  # seconds an extra process waits for the first one's answer


class CountsUnavailable(RuntimeError):
    """An extra SCP process lost its link to the first one: it can claim no association."""


class Counts(Protocol):
    """What an SCP process's front door does with the counts once a connection is in it."""

    def release(self, host: str) -> None: ...
    def claim(self) -> bool: ...
    def unclaim(self) -> None: ...


class ConnectionCounts:
    """The node's counts, kept per owner (this process or one extra process), so that what an
    owner held can be freed at once when it goes (`forget`); the totals are summed over owners
    (a handful: one per SCP process). New connections go only to owners that have joined and
    not been forgotten: one forgotten is never counted again."""

    def __init__(self, max_per_host: int, max_associations: int) -> None:
        self.max_per_host = max_per_host  # 0: no limit
        self.max_associations = max_associations  # 0: no limit
        self._hosts: dict[str, Counter[str]] = {}  # owner -> connections per host
        self._associations: Counter[str] = Counter()  # owner -> associations
        self._serving: list[str] = [LOCAL]  # owners that take new connections, in the order joined
        self._lock = threading.Lock()

    def join(self, owner: str) -> None:
        """An extra SCP process is ready for connections."""
        with self._lock:
            if owner not in self._serving:
                self._serving.insert(-1, owner)  # before LOCAL: ties go to an extra process

    def leave(self, owner: str) -> None:
        """`owner` takes no new connections (its link failed); what it holds stays counted
        until it releases it or is forgotten."""
        with self._lock:
            if owner != LOCAL and owner in self._serving:
                self._serving.remove(owner)

    def admit(self, host: str) -> str | None:
        """Admit a connection from `host` to the owner holding the fewest connections; None
        when `host` holds max_per_host already. The first process, which also runs the
        assembler and the HTTP service, takes one only when no extra process holds fewer."""
        with self._lock:
            if self.max_per_host and sum(held[host] for held in self._hosts.values()) >= self.max_per_host:
                return None
            owner = min(self._serving, key=self._held)
            self._hosts.setdefault(owner, Counter())[host] += 1
            return owner

    def move(self, host: str, owner: str, to: str = LOCAL) -> None:
        """A connection admitted to `owner` is served by `to` instead (it could not be passed on)."""
        with self._lock:
            held = self._hosts.get(owner)
            if held and held[host] > 0:
                held[host] -= 1
            self._hosts.setdefault(to, Counter())[host] += 1

    def release(self, host: str, owner: str = LOCAL) -> None:
        with self._lock:
            held = self._hosts.get(owner)
            if held and held[host] > 0:  # else never admitted here (or already forgotten)
                held[host] -= 1

    def claim(self, owner: str = LOCAL) -> bool:
        with self._lock:
            if self.max_associations and self._associations.total() >= self.max_associations:
                return False
            self._associations[owner] += 1
            return True

    def unclaim(self, owner: str = LOCAL) -> None:
        with self._lock:
            if self._associations[owner] > 0:
                self._associations[owner] -= 1

    def forget(self, owner: str) -> None:
        """`owner` is gone: free every connection and association it still held; it takes no more."""
        with self._lock:
            self._hosts.pop(owner, None)
            self._associations.pop(owner, None)
            if owner != LOCAL and owner in self._serving:
                self._serving.remove(owner)

    def held_by(self, owner: str) -> int:
        with self._lock:
            return self._held(owner)

    def _held(self, owner: str) -> int:  # under the lock
        held = self._hosts.get(owner)
        return held.total() if held else 0

    def per_host(self) -> dict[str, int]:
        with self._lock:
            total: Counter[str] = sum(self._hosts.values(), Counter())  # + drops hosts at 0
            return dict(total)

    def associations(self) -> int:
        with self._lock:
            return self._associations.total()


def serve_counts(counts: ConnectionCounts, link: socket.socket, owner: str) -> threading.Thread:
    """Answer one extra SCP process's calls on `link` until it closes, then free what it held."""

    def run() -> None:
        try:
            with link, link.makefile("rb") as calls:
                for line in calls:
                    verb, _, host = line.decode("ascii").rstrip("\n").partition(" ")
                    if verb == "R":
                        counts.release(host, owner)
                    elif verb == "C":
                        link.sendall(b"1\n" if counts.claim(owner) else b"0\n")
                    elif verb == "U":
                        counts.unclaim(owner)
                    else:
                        raise ValueError(f"unknown call {line!r}")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log_event(log, logging.ERROR, "counts.link_failed", process=owner, error=str(exc))
        finally:
            counts.forget(owner)

    thread = threading.Thread(target=run, name=f"counts-{owner}", daemon=True)
    thread.start()
    return thread


class RemoteCounts:
    """The node's counts, asked of the first process over `link` (an extra SCP process's side).
    Calls from the connection threads are serialised; once the link fails it stays failed
    (an answer could arrive late and be taken for the next one's), and every call raises. The
    link is then shut down, so the first process frees what this one held (it cannot release
    any more), and `on_failure` runs: the extra process ends, and is started again."""

    def __init__(self, link: socket.socket, on_failure: Callable[[], None] | None = None) -> None:
        link.settimeout(ANSWER_TIMEOUT)
        self._link = link
        self._answers = link.makefile("rb")
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._on_failure = on_failure

    def _call(self, line: str, answered: bool) -> bool:
        with self._lock:
            if self._failed:
                raise CountsUnavailable(self._failed)
            try:
                self._link.sendall(line.encode("ascii") + b"\n")
                if not answered:
                    return True
                answer = self._answers.readline()
                if answer not in (b"0\n", b"1\n"):
                    raise OSError(f"answer {answer!r}")
                return answer == b"1\n"
            except OSError as exc:
                self._failed = f"the first SCP process does not answer ({exc or type(exc).__name__})"
                log_event(log, logging.ERROR, "counts.link_failed", error=self._failed)
                try:
                    self._link.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # gone already
                if self._on_failure is not None:
                    self._on_failure()
                raise CountsUnavailable(self._failed) from exc

    def close(self) -> None:
        with self._lock:
            self._failed = self._failed or "closed"
            self._answers.close()
            self._link.close()

    def release(self, host: str) -> None:
        self._call(f"R {host}", answered=False)

    def claim(self) -> bool:
        return self._call("C", answered=True)

    def unclaim(self) -> None:
        self._call("U", answered=False)
