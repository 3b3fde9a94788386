"""Fixtures: DCMTK tools and test data (the in-process node fixtures are in tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dicom_node.synthetic import write_ct_study
from tests.support.node import NODE_AE  # noqa: F401  (re-exported for the tests here)

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


@pytest.fixture
def ct_study(tmp_path) -> tuple[str, list[Path]]:
    return write_ct_study(tmp_path / "ct", 5)
