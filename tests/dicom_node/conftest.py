"""Fixtures: a node running in-process on its own loopback port, DCMTK tools, test data."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dicom_node.config import Settings
from dicom_node.scp import DicomNode
from dicom_node.synthetic import write_ct_study
from tests.support.procs import free_port

NODE_AE = "DICOM_NODE"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def require_tool(name: str) -> str:
    # In CI these come from Debian packages that .ci/run installs: a missing tool fails, never skips.
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: apt-get install dcmtk dicom3tools")
    return path


def run_tool(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    require_tool(args[0])
    result = subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def node_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(
        host="127.0.0.1",
        port=free_port(),
        storage_dir=tmp_path / "store",
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        min_free_disk_mb=1,
        study_idle_seconds=0.5,
        assembly_poll_seconds=0.1,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_node(tmp_path):
    """Start nodes with custom settings; all are stopped at teardown."""
    nodes: list[DicomNode] = []

    def start(**overrides) -> DicomNode:
        node = DicomNode(node_settings(tmp_path, **overrides))
        node.start()  # returns once the listening sockets are bound
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def node(make_node) -> DicomNode:
    return make_node()


@pytest.fixture
def ct_study(tmp_path) -> tuple[str, list[Path]]:
    return write_ct_study(tmp_path / "ct", 5)
