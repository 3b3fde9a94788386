"""DICOM SCU: C-ECHO and C-STORE of files and folders (pynetdicom, TCP_NODELAY on)."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from .netutil import CONNECTION_HANDLER, peer_certificate_names

log = logging.getLogger(__name__)

# Send files straight from disk in their stored transfer syntax: no re-encoding, no whole file in RAM.
_config.STORE_SEND_CHUNKED_DATASET = True

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association

_REJECT_REASONS = {
    (0x01, 0x03): "calling AE title not recognised: register this node's AE title in the peer",
    (0x01, 0x07): "called AE title not recognised: check the peer's AE title",
    (0x01, 0x02): "application context not supported",
    (0x03, 0x02): "peer's association limit reached",
    (0x03, 0x01): "peer temporarily congested",
}


_X509_V_ERR_HOSTNAME_MISMATCH = 62  # OpenSSL verify codes of a certificate that does not name the host dialled
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64


class AssociationFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    ae_title: str = "ANY-SCP"


@dataclass
class SendReport:
    sent: int = 0
    warnings: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # not DICOM or unreadable


@dataclass(frozen=True)
class _FileToSend:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


def _make_ae(calling_ae: str, timeouts: float = 30.0) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeouts
    ae.dimse_timeout = timeouts
    ae.network_timeout = timeouts
    return ae


def associate(ae: AE, peer: Peer, tls_context=None, ext_neg=None, evt_handlers=()) -> Association:
    """Associate with TCP_NODELAY on; raise AssociationFailed saying why it failed.

    `ext_neg` (e.g. SCP/SCU role selection for C-GET) and extra `evt_handlers` pass through to pynetdicom.
    """
    # The host dialled is the name the peer's certificate must carry (when the context checks it).
    tls_args = (tls_context, peer.host) if tls_context else None
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=ext_neg,
        evt_handlers=[CONNECTION_HANDLER, *evt_handlers],
        tls_args=tls_args,
    )
    if assoc.is_established:
        return assoc
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        prim = assoc.acceptor.primitive
        reason = _REJECT_REASONS.get((prim.result_source, prim.diagnostic), f"result {prim.result}, source {prim.result_source}, diagnostic {prim.diagnostic}")
        raise AssociationFailed(f"association rejected by {where} for calling AE {ae.ae_title!r}: {reason}")
    reachable = _tcp_reachable(peer.host, peer.port)
    if reachable is not True:
        raise AssociationFailed(f"could not connect to {where}: {reachable} (peer down, wrong host/port, or a firewall)")
    if tls_context is not None:
        # pynetdicom only logs a failed handshake; without this the error would read like an AE problem.
        failure = _tls_failure(peer.host, peer.port, tls_context)
        if failure:
            raise AssociationFailed(f"DICOM TLS handshake with {where} failed: {failure}")
    raise AssociationFailed(f"{where} accepted the connection but aborted or did not answer the association request")


def _tcp_reachable(host: str, port: int, timeout: float = 5.0) -> bool | str:
    """Only used to explain a failed association: True, or the connection error."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as exc:
        return exc.strerror or str(exc)


def _tls_failure(host: str, port: int, context: ssl.SSLContext, timeout: float = 5.0) -> str | None:
    """Only used to explain a failed TLS association: what went wrong in a fresh handshake, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            # With TLS 1.3 the server checks our certificate after our side of the handshake is done:
            # its refusal arrives as an alert on the first read. A DICOM server that accepted us just waits.
            tls.settimeout(1.0)
            try:
                tls.recv(1)
            except TimeoutError:
                pass
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH):
            names = peer_certificate_names(host, port, context)
            carries = f"names {', '.join(names)}" if names else "does not name it"
            return (f"the peer's certificate is not issued for the host dialled, {host!r}: it {carries}. Dial the "
                    "peer by a name its certificate carries, have its certificate reissued for this name, or turn "
                    "hostname checking off for this peer (check_hostname / tls_check_hostname: false)")
        return (f"the peer's certificate is not trusted ({exc.verify_message}): the TLS CA file must hold the CA "
                "that signed the peer's certificate")
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        hint = ": is this the peer's DICOM TLS port?"
        if "CERTIFICATE" in reason.upper() or "HANDSHAKE_FAILURE" in reason.upper():
            hint = ": the peer wants a client certificate it trusts; set the TLS cert and key (signed by a CA the peer trusts)"
        return f"TLS error {reason}{hint}"
    except OSError:
        return None
    return None


def echo(peer: Peer, calling_ae: str = "DICOM_NODE", tls_context=None) -> int:
    ae = _make_ae(calling_ae)
    ae.add_requested_context(Verification)
    assoc = associate(ae, peer, tls_context)
    try:
        status = assoc.send_c_echo()
        if not status:
            raise AssociationFailed(f"no C-ECHO response from {peer.host}:{peer.port}")
        return int(status.Status)
    finally:
        assoc.release()


def iter_dicom_paths(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _inspect(paths: Iterable[Path], report: SendReport) -> list[_FileToSend]:
    files = []
    for path in iter_dicom_paths(paths):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            files.append(_FileToSend(path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, EOFError) as exc:
            report.skipped.append((str(path), f"not a DICOM file with file meta and SOPClassUID: {exc}"))
    return files


def send(peer: Peer, paths: Iterable[Path], calling_ae: str = "DICOM_NODE", tls_context=None) -> SendReport:
    """C-STORE every DICOM file under `paths`, one association per 128 distinct (SOP class, syntax) pairs."""
    report = SendReport()
    pending = _inspect(paths, report)
    while pending:
        contexts: list[tuple[str, str]] = []
        batch, rest = [], []
        for item in pending:
            key = (item.sop_class_uid, item.transfer_syntax_uid)
            if key in contexts or len(contexts) < MAX_CONTEXTS:
                if key not in contexts:
                    contexts.append(key)
                batch.append(item)
            else:
                rest.append(item)
        _send_batch(peer, batch, contexts, calling_ae, tls_context, report)
        pending = rest
    return report


def _send_batch(peer: Peer, batch: list[_FileToSend], contexts: list[tuple[str, str]], calling_ae: str, tls_context, report: SendReport) -> None:
    ae = _make_ae(calling_ae)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = associate(ae, peer, tls_context)
    try:
        for item in batch:
            if not assoc.is_established:
                report.failed.append((str(item.path), "association lost"))
                continue
            status = assoc.send_c_store(item.path)
            if not status:
                report.failed.append((str(item.path), "no response (timeout or abort)"))
                continue
            code = int(status.Status)
            if code == 0x0000:
                report.sent += 1
            elif code & 0xF000 == 0xB000:
                report.sent += 1
                report.warnings += 1
            else:
                comment = str(status.get("ErrorComment", ""))
                report.failed.append((str(item.path), f"status 0x{code:04X} {comment}".strip()))
    finally:
        if assoc.is_established:
            assoc.release()
