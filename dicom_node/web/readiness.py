"""/readyz: can this node do its work right now? Each check is bounded in time and says why it failed.

- index: a write transaction on the index succeeds (a read-only or locked database fails it)
- storage: a file can be written and fsynced in storage_dir, and free space is above min_free_disk_mb
- broker: Redis answers PING
- archive <name>: each DIMSE archive answers C-ECHO (the result is cached for
  readiness_echo_cache_seconds, so probes do not open an association every few seconds);
  archives with required: false are shown but never make the node unready
- model server: with vlm_backend "openai", GET {vlm_base_url}/models answers 200

Only index and storage decide readiness by default. The broker, the archives and the model
server are downstream: while one is away the node still accepts and durably holds every image
(the pipeline waits and retries by time), and a not-ready SCP would be taken out of its Service,
so the modalities could not send at all. Their failures show as `degraded`. A site whose router
fails over to another node sets readiness_includes_downstream, and they then count too.

/healthz is liveness only (the process answers); it never looks at any of this.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy import text

from ..config import Settings
from ..index import Index


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0
    required: bool = True  # False: shown, but the node is ready without it


@dataclass
class Readiness:
    ready: bool
    checks: list[Check]

    @property
    def degraded(self) -> list[str]:
        """Failing checks that do not decide readiness."""
        return [check.name for check in self.checks if not check.ok and not check.required]

    def to_dict(self) -> dict:
        return {"ready": self.ready, "degraded": self.degraded, "checks": [asdict(check) for check in self.checks]}


class CheckFailed(Exception):
    pass


def check_index(index: Index) -> str:
    with index._write() as conn:  # noqa: SLF001 (the index's one-writer lock for SQLite)
        # Zero rows, but a write statement: a read-only database or a standby refuses it.
        conn.execute(text("UPDATE jobs SET updated_at = updated_at WHERE 1 = 0"))
    return "write transaction committed"


def check_storage(storage_dir: Path, min_free_mb: int) -> str:
    import shutil

    storage_dir.mkdir(parents=True, exist_ok=True)
    probe = storage_dir / f".readyz.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"ready?")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise CheckFailed(f"cannot write in {storage_dir}: {exc.strerror or exc}") from exc
    finally:
        probe.unlink(missing_ok=True)
    free_mb = shutil.disk_usage(storage_dir).free // 2**20
    if free_mb < min_free_mb:
        raise CheckFailed(f"{free_mb} MiB free on {storage_dir}, below min_free_disk_mb {min_free_mb}: "
                          "new instances would be refused")
    return f"writable, {free_mb} MiB free (guard {min_free_mb} MiB)"


def check_broker(broker_url: str, timeout: float) -> str:
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CheckFailed(f"broker {_safe_url(broker_url)} does not answer: {exc}") from exc
    finally:
        client.close()
    return f"{_safe_url(broker_url)} answers PING"


def _safe_url(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def check_archive_echo(archive, calling_ae: str, timeout: float) -> str:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from ..netutil import client_tls_context
    from ..scu import AssociationFailed, Peer, associate

    ae = AE(ae_title=archive.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(timeout, archive.timeout_seconds)
    ae.add_requested_context(Verification)
    tls = client_tls_context(archive.tls_ca, archive.tls_cert, archive.tls_key,
                             check_hostname=archive.tls_check_hostname) if archive.tls_enabled else None
    try:
        assoc = associate(ae, Peer(archive.host, archive.port, archive.ae_title), tls)
    except AssociationFailed as exc:
        raise CheckFailed(str(exc)) from exc
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or int(status.Status) != 0:
        raise CheckFailed(f"C-ECHO to {archive.ae_title}@{archive.host}:{archive.port} answered "
                          f"{'nothing' if not status else f'status 0x{int(status.Status):04X}'}")
    return f"C-ECHO {archive.ae_title}@{archive.host}:{archive.port} succeeded"


def check_model_server(base_url: str, timeout: float) -> str:
    import requests

    url = base_url.rstrip("/") + "/models"
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise CheckFailed(f"model server {url} unreachable: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise CheckFailed(f"model server {url} answered HTTP {response.status_code}")
    return f"{url} answered 200"


class ReadinessChecker:
    """Runs the checks in parallel, each within readiness_timeout_seconds."""

    def __init__(self, settings: Settings, index: Index) -> None:
        self.settings = settings
        self.index = index
        self._echo_cache: dict[str, tuple[float, Check]] = {}
        self._lock = threading.Lock()
        # Enough threads that a hung check (an archive that never answers) cannot starve the next probe.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="readyz")

    def _checks(self) -> list[tuple[str, Callable[[], str], bool]]:
        s = self.settings
        timeout = s.readiness_timeout_seconds
        downstream = s.readiness_includes_downstream
        checks: list[tuple[str, Callable[[], str], bool]] = [
            ("index", lambda: check_index(self.index), True),
            ("storage", lambda: check_storage(Path(s.storage_dir), s.min_free_disk_mb), True),
            ("broker", lambda: check_broker(s.broker_url, timeout), downstream),
        ]
        for archive in s.priors.archives if s.priors.enabled else []:
            if archive.method == "dicomweb":
                continue  # no DIMSE peer to echo; QIDO failures show on the jobs
            checks.append((f"archive {archive.name}", self._cached_echo(archive, timeout),
                           downstream and archive.required))
        if s.vlm_backend == "openai" and s.vlm_base_url:  # a model server does the comparisons
            base_url = s.vlm_base_url
            checks.append(("model server", lambda: check_model_server(base_url, timeout), downstream))
        return checks

    def _cached_echo(self, archive, timeout: float) -> Callable[[], str]:
        def run() -> str:
            with self._lock:
                cached = self._echo_cache.get(archive.name)
            if cached and time.monotonic() - cached[0] < self.settings.readiness_echo_cache_seconds:
                if not cached[1].ok:
                    raise CheckFailed(cached[1].detail + " (cached)")
                return cached[1].detail + " (cached)"
            try:
                detail = check_archive_echo(archive, self.settings.ae_title, timeout)
                result = Check(archive.name, True, detail)
            except Exception as exc:  # noqa: BLE001 - cached as a failure too
                result = Check(archive.name, False, str(exc))
            with self._lock:
                self._echo_cache[archive.name] = (time.monotonic(), result)
            if not result.ok:
                raise CheckFailed(result.detail)
            return result.detail

        return run

    def run(self) -> Readiness:
        timeout = self.settings.readiness_timeout_seconds
        started = time.monotonic()
        futures = [(name, required, self._pool.submit(_timed, fn)) for name, fn, required in self._checks()]
        checks = []
        for name, required, future in futures:
            left = max(0.0, timeout - (time.monotonic() - started)) + 0.5
            try:
                ok, detail, seconds = future.result(timeout=left)
            except FutureTimeout:
                ok, detail, seconds = False, f"no answer within {timeout:g} s", time.monotonic() - started
            checks.append(Check(name, ok, detail, round(seconds, 3), required))
        return Readiness(all(check.ok for check in checks if check.required), checks)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _timed(fn: Callable[[], str]) -> tuple[bool, str, float]:
    started = time.monotonic()
    try:
        return True, fn(), time.monotonic() - started
    except Exception as exc:  # noqa: BLE001 - every failure is a reason on the page
        detail = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
        return False, detail, time.monotonic() - started
