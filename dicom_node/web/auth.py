"""Access to the operations UI: a bearer token read from a file (a mounted Secret).

With a token configured, every page except /healthz, /readyz and /metrics needs it, either as
`Authorization: Bearer <token>` (scripts, curl) or, in a browser, as the session cookie the
login form sets. The cookie holds an HMAC of the token, never the token, so a new token (the
Secret rotated) logs every browser out. With no token configured the service binds loopback
only, and then asks for nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
from pathlib import Path

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/login", "/static/style.css"})
COOKIE = "dicom_node_session"
MIN_TOKEN_LENGTH = 16


class TokenError(ValueError):
    pass


class TokenSource:
    """The token file, re-read when it changes (a Secret update reaches the pod without a restart)."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._token = ""
        if self.path is not None:
            self.current()  # a missing or short token file stops the node at start

    @property
    def configured(self) -> bool:
        return self.path is not None

    def current(self) -> str:
        assert self.path is not None
        with self._lock:
            try:
                stat = os.stat(self.path)
            except OSError as exc:
                if self._token:  # a Secret being swapped: keep the last good token
                    return self._token
                raise TokenError(f"http_token_file {self.path}: {exc.strerror or exc}") from exc
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                token = self.path.read_text(encoding="utf-8").strip()
                if len(token) < MIN_TOKEN_LENGTH:
                    raise TokenError(f"http_token_file {self.path}: the token is shorter than {MIN_TOKEN_LENGTH} "
                                     "characters (use e.g. `openssl rand -hex 32`)")
                self._token, self._stamp = token, stamp
            return self._token

    def accepts(self, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), self.current().encode())

    def session_value(self) -> str:
        return hmac.new(self.current().encode(), b"dicom-node web session", hashlib.sha256).hexdigest()

    def accepts_session(self, cookie: str) -> bool:
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.session_value().encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_host(configured_host: str, token_configured: bool) -> tuple[str, str | None]:
    """The address to listen on, and a warning when it is not the one configured."""
    if token_configured or is_loopback(configured_host):
        return configured_host, None
    return "127.0.0.1", (f"no http_token_file configured: listening on 127.0.0.1 only, not {configured_host}; "
                         "set DICOM_NODE_HTTP_TOKEN_FILE to serve other hosts")
