"""Ports for tests and the local stack are chosen where no outgoing connection can take them.

A listener stopped and started again on its port (a node restarted over the same settings)
failed in CI with "Address already in use": its port came from the kernel's ephemeral range,
and in between an outgoing connection was given it as its local port.
"""

from __future__ import annotations

import socket

from dicom_node.local_stack import procs


def test_ports_are_free_distinct_and_below_the_ephemeral_range():
    low = int(procs.EPHEMERAL_RANGE.read_text().split()[0])  # read here, not through procs
    ports = [procs.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(procs.LOWEST_PORT <= port < low for port in ports)
    for port in ports:  # free: a listener can bind each
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_or_handed_out_before_is_not_handed_out(monkeypatch):
    handed_out = procs.free_port()
    in_use = procs.free_port()
    spare = procs.free_port()
    procs._handed_out.discard(spare)
    picks = iter([handed_out, in_use, spare])
    monkeypatch.setattr(procs.random, "randrange", lambda *_: next(picks))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", in_use))
        procs._handed_out.discard(in_use)  # in use by a socket, not in the process's list
        assert procs.free_port() == spare
