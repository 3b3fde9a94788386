"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

from dicom_node.scp import DicomNode
from tests.support.node import node_settings


@pytest.fixture
def make_node(tmp_path):
    """Start in-process nodes (SCP + assembler) with custom settings; all stop at teardown."""
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
