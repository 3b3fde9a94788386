"""Socket and latency details shared by every DICOM association the node makes or accepts."""

from __future__ import annotations

import functools
import socket
import ssl
import threading
import time
import types
from pathlib import Path

import pynetdicom.association
from pydicom import uid
from pynetdicom import _config, evt

# pynetdicom 3.0 moves messages between its socket thread and its association thread by
# polling, sleeping 1 ms between polls in both. Three such hops per C-STORE cap a single
# association at ~300 images/s whatever the CPU. Polling every 100 us instead roughly
# doubles throughput and costs no measurable CPU on an idle association
# (benchmarks/ingest.py). There is no setting for either sleep, hence the two patches.
POLL_INTERVAL_S = 0.0001

# What the SCP accepts and what the node asks an archive for (C-MOVE/C-GET): every syntax pydicom
# can decode, uncompressed first.
ACCEPTED_TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]


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


class ClientTlsContext(ssl.SSLContext):
    """The TLS context for calling one peer; it keeps the files it was built from, so that a failed
    handshake can be explained by a second look at the peer's certificate (`peer_certificate_names`)."""

    files: tuple[Path | None, Path | None, Path | None] = (None, None, None)  # ca, cert, key


def client_tls_context(ca: Path | None, cert: Path | None = None, key: Path | None = None,
                       check_hostname: bool = True) -> ssl.SSLContext:
    """Verify the peer's certificate against `ca` (None: the system trust store) and, unless
    `check_hostname` is false, that it names the host dialled (pass the host as server_hostname)."""
    context = ClientTlsContext(ssl.PROTOCOL_TLS_CLIENT)  # what ssl.create_default_context(SERVER_AUTH) builds
    if ca:
        context.load_verify_locations(cafile=str(ca))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if cert and key:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    context.files = (ca, cert, key)
    return context


def peer_certificate_names(host: str, port: int, context: ssl.SSLContext, timeout: float = 5.0) -> list[str] | None:
    """The names in the certificate a TLS peer presents ("DNS:pacs.example", "IP:10.0.0.5", "CN=pacs"),
    read in a handshake that checks the chain as `context` does but not the name; None if unreadable."""
    if not isinstance(context, ClientTlsContext):
        return None
    probe = client_tls_context(*context.files, check_hostname=False)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, probe.wrap_socket(raw) as tls:
            cert = tls.getpeercert() or {}
    except (OSError, ValueError):
        return None
    kinds = {"DNS": "DNS", "IP Address": "IP"}
    names = [f"{kinds.get(kind, kind)}:{value}" for kind, value in cert.get("subjectAltName", ())]
    names += [f"CN={value}" for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names


def https_session(ca: Path | None, cert: Path | None = None, key: Path | None = None, check_hostname: bool = True):
    """A requests session for a DICOMweb peer: `ca` (None: the system trust store), an optional client
    certificate, and the host name checked unless `check_hostname` is false."""
    session = _session_class()()
    session.verify = str(ca) if ca else True
    if cert and key:
        session.cert = (str(cert), str(key))
    if not check_hostname:
        session.mount("https://", _no_hostname_check_adapter_class()())
    return session


@functools.cache
def _session_class():
    import requests

    class PeerSession(requests.Session):
        """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's CA bundle; the CA
        configured for the peer wins here (the environment still supplies proxies)."""

        def merge_environment_settings(self, url, proxies, stream, verify, cert):
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None and isinstance(self.verify, str):
                merged["verify"] = self.verify
            return merged

    return PeerSession


@functools.cache
def _no_hostname_check_adapter_class():
    from requests.adapters import HTTPAdapter

    class NoHostnameCheck(HTTPAdapter):
        """The chain is still verified; only the name in the certificate is not compared with the URL's host."""

        def init_poolmanager(self, *args, **kwargs):
            kwargs["assert_hostname"] = False
            super().init_poolmanager(*args, **kwargs)

    return NoHostnameCheck


tune_pynetdicom()
