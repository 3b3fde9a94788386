"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

from dicom_node.scp import DicomNode
from tests.support.node import node_settings
from tests.support.postgres import PostgresServer


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


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the session (started on first use); fails if PostgreSQL is missing."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's PostgreSQL (SQLAlchemy URL); dropped afterwards."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def model_server(tmp_path_factory):
    """One real `transformers serve` (tiny random Gemma 3, CPU) behind a recording proxy, for the session."""
    from tests.support.model_server import start_served

    served = start_served(tmp_path_factory.mktemp("served"))
    yield served
    served.proxy.close()
    served.server.stop()


@pytest.fixture
def served(model_server):
    model_server.proxy.reset()  # plain forwarding, counters at zero
    return model_server
