"""Start and stop real peer processes (the node, DCMTK storescp) on loopback ports of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dicom_node.local_stack.procs import free_port, stop, wait_for_port  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]


def child_pids(pid: int) -> list[int]:
    """Children of every thread of `pid`, from /proc (`serve` starts each extra SCP process
    from a thread of its own, and /proc lists a child under the thread that started it)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
        except OSError:
            pass  # a thread that ended meanwhile
    return found


def node_env(root: Path, port: int, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DICOM_NODE_HOST="127.0.0.1",
        DICOM_NODE_PORT=str(port),
        DICOM_NODE_STORAGE_DIR=str(root / "store"),
        DICOM_NODE_DATABASE_URL=f"sqlite:///{root / 'index.db'}",
        DICOM_NODE_MIN_FREE_DISK_MB="1",
        DICOM_NODE_LOG_FORMAT="json",
        DICOM_NODE_HTTP_PORT=str(free_port()),
    )
    env.update(extra_env or {})
    return env


def start_node(root: Path, port: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`dicom-node serve` as its own process (so it can be killed -9 and restarted)."""
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "serve.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve"],
        env=node_env(root, port, extra_env),
        stdout=log,
        stderr=log,
        cwd=REPO,
    )


def start_storescp(folder: Path, port: int, ae_title: str = "STORESCP") -> subprocess.Popen:
    if shutil.which("storescp") is None:
        raise RuntimeError("DCMTK storescp not found: apt-get install dcmtk")
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        ["storescp", "-aet", ae_title, "-od", str(folder), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
