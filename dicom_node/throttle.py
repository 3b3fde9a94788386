"""A bound on the audit rows (and log lines) that refused connections can cause.

Every refused or cut connection is audited with the peer address and the reason. A host that
opens thousands of garbage connections a second would turn that into as many rows a second,
until the disk is full. So each peer address gets `limit` rows per `window` seconds; what it
sends beyond that is counted, and the count goes into its next row ("... and N more refusals
from this host not audited since ..."), or into a row of its own when the node stops.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MAX_PEERS = 10_000  # peer addresses tracked at once: memory stays bounded under any flood


@dataclass
class _Peer:
    window_start: float
    written: int = 0
    suppressed: int = 0
    suppressed_since: float = 0.0


class RefusalThrottle:
    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit  # 0: no limit
        self.window = window
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()

    def admit(self, host: str, now: float | None = None) -> tuple[bool, int, float]:
        """(write this one?, refusals not written before it, since when) for a refusal from `host`."""
        if not self.limit:
            return True, 0, 0.0
        now = time.time() if now is None else now
        with self._lock:
            peer = self._peers.get(host)
            if peer is None or now - peer.window_start >= self.window:
                if peer is None and len(self._peers) >= MAX_PEERS:
                    self._prune(now)
                carried = (peer.suppressed, peer.suppressed_since) if peer else (0, 0.0)
                peer = self._peers[host] = _Peer(window_start=now)
                peer.written = 1
                return True, carried[0], carried[1]
            if peer.written < self.limit:
                peer.written += 1
                return True, 0, 0.0
            if not peer.suppressed:
                peer.suppressed_since = now
            peer.suppressed += 1
            return False, 0, 0.0

    def drain(self) -> list[tuple[str, int, float]]:
        """(host, count, since) of every refusal counted but not yet written; forgets them."""
        with self._lock:
            pending = [(host, peer.suppressed, peer.suppressed_since) for host, peer in self._peers.items() if peer.suppressed]
            for host, _, _ in pending:
                self._peers[host].suppressed = 0
            return pending

    def _prune(self, now: float) -> None:
        # Forget peers whose window is over and who have nothing counted; if that is not
        # enough (a flood from very many addresses), forget the oldest half.
        for host in [h for h, p in self._peers.items() if now - p.window_start >= self.window and not p.suppressed]:
            del self._peers[host]
        if len(self._peers) >= MAX_PEERS:
            for host in sorted(self._peers, key=lambda h: self._peers[h].window_start)[: MAX_PEERS // 2]:
                del self._peers[host]


def suppressed_note(count: int, since: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    return f"{count} more refusal(s) from this host not audited since {stamp} (refusal_audit_limit)"
