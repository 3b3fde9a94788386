"""A real PostgreSQL (Debian `postgresql`) for tests: its own cluster in a temporary folder, on a
loopback port of its own (and a Unix socket in that folder), one fresh database per test.

initdb and postgres refuse to run as root, so as root both run as the `postgres` OS user (created
by the Debian package), in a temporary folder that user owns (pytest's tmp_path is not reachable
for it: /tmp/pytest-of-root is 0700). Missing PostgreSQL is an error, never a skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from dicom_node.local_stack.procs import free_port

OS_USER = "postgres"  # runs the server when the tests run as root
SUPERUSER = "postgres"  # the database role initdb creates (trust authentication, loopback only)


def postgres_bindir() -> Path:
    """The folder with initdb and postgres: on PATH, else the newest /usr/lib/postgresql/N/bin."""
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "postgres").exists():
        return Path(initdb).resolve().parent  # resolved: the other tools (pg_dump...) sit beside it
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    for found in reversed(candidates):
        if (found.parent / "postgres").exists():
            return found.parent
    raise RuntimeError(
        "PostgreSQL not found (no initdb/postgres on PATH or in /usr/lib/postgresql/*/bin): "
        "apt-get install postgresql (scripts/setup.sh installs it)"
    )


class PostgresServer:
    """`start()`, then `create_database()` / `url(name)` / `drop_database(name)`, then `stop()`."""

    def __init__(self, port: int | None = None, max_connections: int = 200) -> None:
        self.port = port or free_port()
        self.max_connections = max_connections
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._names = itertools.count(1)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> "PostgresServer":
        bindir = postgres_bindir()
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise RuntimeError('psycopg not installed: pip install -e ".[test,postgres]"') from exc
        as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        try:
            if as_root:
                shutil.chown(self.root, OS_USER, OS_USER)
            data = self.root / "data"
            run = dict(env=self._env(), cwd=self.root, **(self._as_postgres() if as_root else {}))
            init = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                 "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"],
                capture_output=True, text=True, **run,
            )
            if init.returncode != 0:
                raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}{init.stderr}")
            log = open(self.root / "postgres.log", "ab")
            try:
                self.proc = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port),
                     "-k", str(self.root),  # the Unix socket in the temporary folder, not /var/run/postgresql
                     "-c", "listen_addresses=127.0.0.1",
                     "-c", f"max_connections={self.max_connections}",
                     "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    stdout=log, stderr=log, **run,
                )
            finally:
                log.close()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # fast shutdown: disconnects the clients left
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
            self.proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- databases ----------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL (psycopg 3 driver) of `database` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        name = name or f"test_{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: connections a test left open

    # --- internals ----------------------------------------------------------------------

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def _conninfo(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database} connect_timeout=5"

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode} at start:\n{self._log_tail()}")
            try:
                with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres not ready after {timeout}s ({exc}):\n{self._log_tail()}") from exc
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return (self.root / "postgres.log").read_text(errors="replace")[-4000:]  # type: ignore[operator]
        except OSError:
            return ""

    @staticmethod
    def _env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    @staticmethod
    def _as_postgres() -> dict:
        try:
            import pwd

            pwd.getpwnam(OS_USER)
        except KeyError as exc:
            raise RuntimeError(
                f"running as root, and there is no {OS_USER!r} OS user to run PostgreSQL as "
                "(the Debian postgresql package creates it)"
            ) from exc
        return dict(user=OS_USER, group=OS_USER, extra_groups=[])
