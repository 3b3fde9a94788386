"""Socket and latency details shared by every DICOM association the node makes or accepts."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import types
from pathlib import Path

import pynetdicom.association
from pynetdicom import _config, evt

# pynetdicom 3.0 moves messages between its socket thread and its association thread by
# polling, sleeping 1 ms between polls in both. Three such hops per C-STORE cap a single
# association at ~300 images/s whatever the CPU. Polling every 100 us instead roughly
# doubles throughput and costs no measurable CPU on an idle association
# (benchmarks/ingest.py). There is no setting for either sleep, hence the two patches.
POLL_INTERVAL_S = 0.0001


def _reactor_sleep(seconds: float) -> None:
    # Only associations we accept poll faster. On the ones we request, pynetdicom pauses the
    # reactor with a handshake that has a window (the reactor can pass its checkpoint just
    # before it is cleared and take a response off the queue); faster polling widens that
    # window until C-FIND answers get lost, so requestors keep pynetdicom's own interval.
    if getattr(threading.current_thread(), "is_acceptor", False):
        seconds = min(seconds, POLL_INTERVAL_S)
    time.sleep(seconds)


def tune_pynetdicom() -> None:
    """Apply once per process, before any association starts."""
    # The association reactor (an Association thread) uses `time` only for its polling sleeps.
    pynetdicom.association.time = types.SimpleNamespace(sleep=_reactor_sleep)  # type: ignore[attr-defined]
    # pynetdicom's standard log handlers format every PDU; the node audits associations itself.
    _config.LOG_HANDLER_LEVEL = "none"


def _tune_connection(event: evt.Event) -> None:
    event.assoc.dul._run_loop_delay = POLL_INTERVAL_S
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Without TCP_NODELAY, small PDUs (C-STORE-RSP, P-DATA tails) wait on Nagle +
        # delayed ACK and a peer pair stalls at 10-20 images/s; pynetdicom has no switch.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# Bind in every ae.start_server(...) and ae.associate(...) call.
CONNECTION_HANDLER = (evt.EVT_CONN_OPEN, _tune_connection)


def server_tls_context(cert: Path, key: Path, ca: Path | None, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return context


def client_tls_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # PACS certificates are rarely issued for the host name used
    if cert and key:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


tune_pynetdicom()
