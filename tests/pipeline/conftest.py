from __future__ import annotations

import pytest

from dicom_node.local_stack.stack import LocalStack, Ports


@pytest.fixture
def stack(tmp_path):
    """A fresh local stack (Redis, Orthanc as the PACS, serve, io and gpu workers) for one test."""
    stack = LocalStack(tmp_path / "stack", Ports.free())
    try:
        yield stack.start()
    finally:
        stack.stop()
