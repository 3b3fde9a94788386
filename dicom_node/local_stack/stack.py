"""The whole product on one host, on loopback: Redis, Orthanc as the PACS (routing studies to
the node), the node's SCP + pipeline coordinator + status API, an io worker and a gpu worker.

The quickstart runs it with fixed ports inside its own network namespace; the end-to-end and
fault tests run it with free ports. Each service is a real process that can be stopped,
killed or restarted on its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .orthanc import Orthanc, routing_lua
from .procs import free_port, stop, wait_for_port
from .redis_server import RedisServer

NODE_AE = "DICOM_NODE"
MODALITY_AE = "MODALITY"  # the acquisition device whose studies Orthanc routes to the node
PIDFILE = "pids.json"


@dataclass
class Ports:
    node: int = 11112
    http: int = 8080
    redis: int = 6379
    orthanc_dicom: int = 4242
    orthanc_http: int = 8042

    @classmethod
    def free(cls) -> "Ports":
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())


@dataclass
class LocalStack:
    workdir: Path
    ports: Ports = field(default_factory=Ports)
    extra_env: dict[str, str] = field(default_factory=dict)
    study_idle_seconds: float = 2.0
    redis: RedisServer | None = None
    orthanc: Orthanc | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Workers run under `dicom-node worker --restart-on-exit`: a worker that exits non-zero or whose
    # heartbeat goes stale (`dicom-node worker-alive`) is restarted by its wrapper, which lives as
    # long as the worker should (the quickstart command itself returns). kill_group() still kills
    # both (a crash). Off for the tests and benchmarks, which kill and restart workers themselves.
    supervise_workers: bool = False

    def node_env(self) -> dict[str, str]:
        """Settings shared by every node process (SCP, workers, CLI), as DICOM_NODE_* variables."""
        node = self.workdir / "node"
        pacs = {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": self.ports.orthanc_dicom}
        env = dict(os.environ)
        env.update(
            DICOM_NODE_AE_TITLE=NODE_AE,
            DICOM_NODE_HOST="127.0.0.1",
            DICOM_NODE_PORT=str(self.ports.node),
            DICOM_NODE_HTTP_PORT=str(self.ports.http),
            DICOM_NODE_STORAGE_DIR=str(node / "store"),
            DICOM_NODE_DATABASE_URL=f"sqlite:///{node / 'index.db'}",
            DICOM_NODE_WORK_DIR=str(node / "jobs"),
            DICOM_NODE_MIN_FREE_DISK_MB="100",
            DICOM_NODE_STUDY_IDLE_SECONDS=str(self.study_idle_seconds),
            DICOM_NODE_ASSEMBLY_POLL_SECONDS="0.5",
            DICOM_NODE_DISPATCH_POLL_SECONDS="0.5",
            DICOM_NODE_BROKER_URL=f"redis://127.0.0.1:{self.ports.redis}/0",
            DICOM_NODE_RESULT_BACKEND=f"redis://127.0.0.1:{self.ports.redis}/1",
            DICOM_NODE_RETRY_BACKOFF_SECONDS="1",
            DICOM_NODE_RETRY_BACKOFF_MAX_SECONDS="5",
            # One host, short outages: a dead worker's stage and a lost wake-up move on within seconds.
            DICOM_NODE_JOB_LEASE_SECONDS="6",
            DICOM_NODE_REPUBLISH_AFTER_SECONDS="15",
            DICOM_NODE_PRIORS__ARCHIVES=json.dumps([{**pacs, "method": "c-move"}]),
            # A send that dies with its worker is retried after 4 x timeout_seconds: keep that short here.
            DICOM_NODE_REPORT__DESTINATIONS=json.dumps([{**pacs, "timeout_seconds": 10}]),
            DICOM_NODE_REPORT__BACKOFF_BASE_SECONDS="1",
            DICOM_NODE_REPORT__BACKOFF_MAX_SECONDS="5",
            DICOM_NODE_LOG_FORMAT="json",
            TCP_NODELAY="1",
        )
        env.update(self.extra_env)
        return env

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, io_workers: int = 1, gpu_workers: int = 1) -> "LocalStack":
        self.workdir = self.workdir.resolve()  # every process gets absolute paths, whatever its cwd
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.workdir / "redis", port=self.ports.redis).start()
        self.orthanc = Orthanc(
            self.workdir / "orthanc",
            modalities={"node": (NODE_AE, "127.0.0.1", self.ports.node)},
            lua=routing_lua(MODALITY_AE, "node"),
            dicom_port=self.ports.orthanc_dicom,
            http_port=self.ports.orthanc_http,
        ).start()
        self.start_node()
        for number in range(1, io_workers + 1):
            self.start_worker("io", number)
        for number in range(1, gpu_workers + 1):
            self.start_worker("gpu", number)
        self.write_pids()
        return self

    def start_node(self) -> subprocess.Popen:
        proc = self._spawn("node", ["serve"])
        wait_for_port(self.ports.node, timeout=60, proc=proc)
        return proc

    def start_worker(self, queue: str, number: int = 1) -> subprocess.Popen:
        name = f"{queue}{number}"
        restart = ["--restart-on-exit"] if self.supervise_workers else []
        return self._spawn(f"worker-{name}", ["worker", "--queues", queue, "--hostname", f"{name}@%h", *restart])

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", *args],
            env=self.node_env(),
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: kill_group() takes a worker's pool children too
        )
        self.processes[name] = proc
        self.write_pids()
        return proc

    def kill_group(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a node process and its children at once (a crash, not a shutdown)."""
        proc = self.processes.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait()
        self.write_pids()

    def stop(self) -> None:
        for name in list(self.processes):
            stop(self.processes.pop(name), timeout=20)
        if self.orthanc:
            self.orthanc.stop()
        if self.redis:
            self.redis.stop()
        (self.workdir / PIDFILE).unlink(missing_ok=True)

    def write_pids(self) -> None:
        pids = {name: proc.pid for name, proc in self.processes.items()}
        for name, service in (("redis", self.redis), ("orthanc", self.orthanc)):
            if service is not None and service.proc is not None:
                pids[name] = service.proc.pid
        (self.workdir / PIDFILE).write_text(json.dumps(pids, indent=2))


def stop_from_pidfile(workdir: Path) -> dict[str, int]:
    """Signal what an earlier run started (e.g. `dicom-node quickstart --stop` from another shell);
    returns the processes signalled, by name."""
    pidfile = workdir / PIDFILE
    if not pidfile.exists():
        return {}
    stopped = {}
    for name, pid in json.loads(pidfile.read_text()).items():
        try:
            os.killpg(pid, signal.SIGTERM) if name.startswith(("node", "worker")) else os.kill(pid, signal.SIGTERM)
            stopped[name] = pid
        except ProcessLookupError:
            continue
    pidfile.unlink()
    return stopped
