"""Passing accepted connections from the first SCP process to an extra one, over a real
SOCK_SEQPACKET socket pair with real TCP connections (connection_handoff.py)."""

from __future__ import annotations

import logging
import queue
import socket
import threading

import pytest

from dicom_node.connection_handoff import Handoff, link_pair, receive_connections


@pytest.fixture
def tcp_pair():
    """(client, accepted server-side socket, the client's address as accepted)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, address = listener.accept()
    listener.close()
    yield client, accepted, address
    client.close()
    accepted.close()


@pytest.fixture
def linked():
    """A Handoff with one extra process "scp-process-2" whose receiver puts what it is passed on a queue."""
    first_end, extra_end = link_pair()
    passed: queue.Queue = queue.Queue()
    ended = threading.Event()
    thread = receive_connections(extra_end, lambda *call: passed.put(call), on_end=ended.set)
    handoff = Handoff()
    assert handoff.wait_ready("scp-process-2", first_end)
    yield handoff, passed, first_end
    handoff.remove("scp-process-2")
    thread.join(5)
    # The receiver ends when the first process closes the link, and says so: the process ends.
    assert not thread.is_alive() and ended.is_set()


def test_a_passed_connection_is_the_same_connection_with_its_listener_and_peer(linked, tcp_pair):
    handoff, passed, _ = linked
    client, accepted, address = tcp_pair
    assert handoff.pass_connection("scp-process-2", accepted, "tls", address)
    accepted.close()  # the first process closes its descriptor; the connection lives on
    listener, connection, peer = passed.get(timeout=5)
    with connection:
        assert (listener, peer) == ("tls", address)
        client.sendall(b"A-ASSOCIATE-RQ")
        assert connection.recv(64) == b"A-ASSOCIATE-RQ"
        connection.sendall(b"A-ASSOCIATE-AC")
        assert client.recv(64) == b"A-ASSOCIATE-AC"


def test_passing_to_a_process_that_is_gone_fails_and_drops_it(tcp_pair, caplog):
    first_end, extra_end = link_pair()
    handoff = Handoff()
    extra_end.sendall(b"ready")
    assert handoff.wait_ready("scp-process-2", first_end)
    extra_end.close()  # what a kill -9 of the extra process does
    _, accepted, address = tcp_pair
    with caplog.at_level(logging.ERROR, logger="dicom_node.connection_handoff"):
        assert not handoff.pass_connection("scp-process-2", accepted, "plain", address)
    assert "handoff.link_failed" in caplog.text
    assert not handoff.pass_connection("scp-process-2", accepted, "plain", address)  # dropped: not tried again


def test_a_process_that_ends_before_it_is_ready_is_not_taken_on():
    first_end, extra_end = link_pair()
    extra_end.close()
    handoff = Handoff()
    assert not handoff.wait_ready("scp-process-2", first_end)
    assert not handoff.pass_connection("scp-process-2", socket.socket(), "plain", ("127.0.0.1", 1))


def test_a_bad_message_is_logged_and_the_receiver_goes_on(linked, tcp_pair, caplog):
    handoff, passed, first_end = linked
    client, accepted, address = tcp_pair
    with caplog.at_level(logging.ERROR, logger="dicom_node.connection_handoff"):
        first_end.sendall(b"no descriptor")
        stray = socket.socket()
        socket.send_fds(first_end, [b"{not json"], [stray.fileno()])
        stray.close()
        assert handoff.pass_connection("scp-process-2", accepted, "plain", address)
        listener, connection, peer = passed.get(timeout=5)
    connection.close()
    assert (listener, peer) == ("plain", address)
    assert passed.empty()
    assert caplog.text.count("handoff.bad_message") == 2


def test_a_connection_that_cannot_be_served_is_closed_and_the_receiver_goes_on(caplog):
    first_end, extra_end = link_pair()
    served: queue.Queue = queue.Queue()

    def serve(listener, connection, peer):
        if listener == "gone":  # e.g. a listener this process does not have
            raise KeyError(listener)
        served.put((listener, connection))

    thread = receive_connections(extra_end, serve)
    handoff = Handoff()
    assert handoff.wait_ready("scp-process-2", first_end)
    listener = socket.create_server(("127.0.0.1", 0))
    clients = [socket.create_connection(listener.getsockname()) for _ in range(2)]
    try:
        with caplog.at_level(logging.ERROR, logger="dicom_node.connection_handoff"):
            for name in ("gone", "plain"):
                accepted, address = listener.accept()
                assert handoff.pass_connection("scp-process-2", accepted, name, address)
                accepted.close()
            name, connection = served.get(timeout=5)
        connection.close()
        assert name == "plain" and "handoff.serve_failed" in caplog.text
        clients[0].settimeout(5)
        assert clients[0].recv(1) == b""  # the one that could not be served was closed, not left hanging
    finally:
        for client in clients:
            client.close()
        listener.close()
        handoff.remove("scp-process-2")
        thread.join(5)
