"""Independent validators for what the node writes: dciodvfy (dicom3tools) and DCMTK dsrdump."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} not found: apt-get install dicom3tools dcmtk")
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def assert_valid_dicom(path: Path) -> str:
    """dciodvfy reports no error, and DCMTK dsrdump parses SRs; returns the dsrdump text."""
    result = _run("dciodvfy", str(path))
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    text = ""
    if "SR" in _run("dcmdump", "+P", "0008,0060", str(path)).stdout:
        dump = _run("dsrdump", "-Ee", "-Ec", str(path))
        bad = [line for line in (dump.stdout + dump.stderr).splitlines() if line.startswith(("E:", "F:"))]
        assert dump.returncode == 0 and not bad, f"dsrdump failed on {path.name}:\n{dump.stderr}"
        text = dump.stdout
    return text
