"""DICOM SCU: C-ECHO and C-STORE of files and folders (pynetdicom, TCP_NODELAY on)."""

from __future__ import annotations

import logging
import socket
import time
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
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
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): not stored by the peer
    skipped: list[tuple[str, str]] = field(default_factory=list)  # not DICOM or unreadable: never offered
    warned: list[tuple[str, str]] = field(default_factory=list)  # (path, status): stored, with a warning status
    converted: list[tuple[str, str]] = field(default_factory=list)  # (path, how): stored, not as the file holds it
    association_failures: list[str] = field(default_factory=list)  # one per association that could not be made
    associations: int = 0  # associations made


@dataclass(frozen=True)
class _FileToSend:
    path: Path
    sop_class_uid: str  # from the dataset, as storescu takes it (the file meta may disagree)
    sop_instance_uid: str
    transfer_syntax_uid: str
    meta_matches: bool  # the file meta names the same SOP class and instance: streamed from disk as stored
    no_preamble: bool = False  # file meta without the 128-byte preamble and "DICM"

    def read(self) -> Dataset:
        return dcmread(self.path, force=self.no_preamble)

    def contexts(self) -> list[tuple[str, tuple[str, ...]]]:
        """The presentation contexts this file needs: its own transfer syntax on its own (so a peer
        that accepts it is not offered an alternative to prefer), and the uncompressed fallbacks."""
        if self.transfer_syntax_uid in UNCOMPRESSED:
            return [(self.sop_class_uid, UNCOMPRESSED)]
        return [(self.sop_class_uid, (self.transfer_syntax_uid,)), (self.sop_class_uid, UNCOMPRESSED)]


UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)  # what every storage SCP accepts
_STORE_WARNINGS = {0x0001, 0x0107, 0x0116}  # besides 0xBxxx: coercion, attribute list/value out of range

_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason given",
    0x03: "abstract syntax (SOP class) not supported",
    0x04: "transfer syntax not supported",
}


DEFAULT_TIMEOUT = 30.0  # seconds


def _make_ae(calling_ae: str, timeouts: float = DEFAULT_TIMEOUT) -> AE:
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
    prim = assoc.acceptor.primitive if assoc.is_rejected else _unread_rejection(assoc)
    if prim is not None:
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


def _unread_rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE-RJ pynetdicom 3.0 received but never read, if any.

    A peer that rejects at once (Orthanc over loopback, about 1 request in 20) can have the
    reject read and the socket closed by the DUL thread before the ACSE looks at the socket;
    the ACSE then sees "not connected" and aborts, and the reject stays in the DUL's queue."""
    for item in list(assoc.dul.to_user_queue.queue):
        if isinstance(item, A_ASSOCIATE) and item.result in (0x01, 0x02):
            return item
    return None


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
            force = _meta_without_preamble(path)  # read as storescu does; pydicom wants the 128-byte preamble
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"], force=force)
            meta = ds.file_meta
            syntax = str(meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, OSError, EOFError, ValueError) as exc:
            report.skipped.append((str(path), f"not a DICOM file with file meta and a transfer syntax: {exc}"))
            continue
        missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if not ds.get(kw)]
        if missing:
            report.skipped.append((str(path), f"the dataset has no {' or '.join(missing)}"))
            continue
        sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        in_meta = (str(meta.get("MediaStorageSOPClassUID", "")), str(meta.get("MediaStorageSOPInstanceUID", "")))
        meta_matches = in_meta == (sop_class, sop_instance)
        files.append(_FileToSend(path, sop_class, sop_instance, syntax, meta_matches, force))
    return files


def _meta_without_preamble(path: Path) -> bool:
    """A file that starts with a file meta element (group 0002) but has no preamble."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x02\x00"
    except OSError:
        return False


def send(peer: Peer, paths: Iterable[Path], calling_ae: str = "DICOM_NODE", tls_context=None,
         decompress: bool = True, timeout: float = DEFAULT_TIMEOUT) -> SendReport:
    """C-STORE every DICOM file under `paths`; never stops at a refusal: every file ends up sent,
    failed (with the reason) or skipped in the report.

    Each file is offered in its own transfer syntax and, as fallbacks, Explicit and Implicit VR Little
    Endian; it is sent as stored (streamed from disk) where the peer accepts its syntax. Where the peer
    accepts only a fallback, an uncompressed file is re-encoded by pynetdicom and a compressed one is
    decoded first (`decompress`; false: it fails as refused). Files needing more than 128 presentation
    contexts in all are split over several associations. `timeout`: seconds to wait for the
    association, and for each C-STORE response.
    """
    report = SendReport()
    pending = _inspect(paths, report)
    while pending:
        contexts: list[tuple[str, tuple[str, ...]]] = []
        batch, rest = [], []
        for item in pending:
            new = [c for c in item.contexts() if c not in contexts]
            if len(contexts) + len(new) <= MAX_CONTEXTS - 1:  # one is Verification
                contexts.extend(new)
                batch.append(item)
            else:
                rest.append(item)
        _send_batch(peer, batch, contexts, calling_ae, tls_context, decompress, timeout, report)
        pending = rest
    return report


def _send_batch(peer: Peer, batch: list[_FileToSend], contexts: list[tuple[str, tuple[str, ...]]], calling_ae: str,
                tls_context, decompress: bool, timeout: float, report: SendReport) -> None:
    ae = _make_ae(calling_ae, timeout)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    # Always offered too, so a peer refusing every SOP class offered still accepts the association
    # and each refusal is reported per file instead of as an unexplained abort.
    ae.add_requested_context(Verification)
    try:
        assoc = associate(ae, peer, tls_context)
    except AssociationFailed as exc:
        report.association_failures.append(str(exc))
        report.failed.extend((str(item.path), f"not sent: {exc}") for item in batch)
        return
    report.associations += 1
    try:
        for item in batch:
            if not assoc.is_established:
                report.failed.append((str(item.path), "not sent: the association was aborted or released by the peer"))
                continue
            _send_one(assoc, item, decompress, report)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_one(assoc: Association, item: _FileToSend, decompress: bool, report: SendReport) -> None:
    path = str(item.path)
    syntax = UID(item.transfer_syntax_uid)
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class_uid]
    exact = any(cx.transfer_syntax[0] == syntax for cx in accepted)
    fallback = next((UID(cx.transfer_syntax[0]) for cx in accepted if cx.transfer_syntax[0] in UNCOMPRESSED), None)
    how = None  # set when the file is not sent byte for byte as stored
    started = time.monotonic()
    try:
        if exact and item.meta_matches:
            status = assoc.send_c_store(item.path)  # straight from disk, as stored
        elif exact:
            # pynetdicom names a file's instance by its file meta; the dataset's own UIDs go in the request.
            how = (f"sent as read by pydicom ({syntax.name}): its file meta names another SOP instance or class "
                   "than its dataset")
            status = assoc.send_c_store(item.read())
        elif fallback is None:
            report.failed.append((path, _refusal(assoc, item)))
            return
        elif not syntax.is_little_endian:
            report.failed.append((path, f"{_refusal(assoc, item)}; the peer accepts {_sop_name(item)} only in "
                                        f"{fallback.name}, and converting {syntax.name} to it is not supported"))
            return
        elif not syntax.is_compressed:
            how = f"sent re-encoded as {fallback.name}: the peer refused {syntax.name}"
            status = assoc.send_c_store(item.read())  # re-encoded by pynetdicom
        elif not decompress:
            report.failed.append((path, f"skipped: the peer refused its transfer syntax {syntax.name} for "
                                        f"{_sop_name(item)} (it accepts {fallback.name}), and decompression is off"))
            return
        else:
            ds = item.read()
            try:
                ds.decompress(generate_instance_uid=False)  # the same instance in another transfer syntax
            except Exception as exc:  # noqa: BLE001 - any decoder failure: report it, go on with the batch
                report.failed.append((path, f"skipped: the peer refused its transfer syntax {syntax.name} for "
                                            f"{_sop_name(item)} (it accepts {fallback.name}) and it could not be "
                                            f"decoded: {exc}"))
                return
            how = f"sent decompressed as {fallback.name}: the peer refused {syntax.name}"
            status = assoc.send_c_store(ds)
    except (ValueError, AttributeError, RuntimeError, OSError, EOFError) as exc:
        report.failed.append((path, f"not sent: {exc}"))
        return
    if not status or "Status" not in status:
        report.failed.append((path, _no_response(assoc, time.monotonic() - started)))
        return
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "")).strip()
    if how and (code == 0x0000 or code & 0xF000 == 0xB000 or code in _STORE_WARNINGS):
        report.converted.append((path, how))
    if code == 0x0000:
        report.sent += 1
    elif code & 0xF000 == 0xB000 or code in _STORE_WARNINGS:
        report.sent += 1
        report.warnings += 1
        report.warned.append((path, f"status 0x{code:04X} {comment}".strip()))
    else:
        report.failed.append((path, f"refused with status 0x{code:04X} {comment}".strip()))


def _no_response(assoc: Association, waited: float) -> str:
    """Why a C-STORE got no response: pynetdicom aborts the association itself when the wait
    runs out, so the time waited tells a silent peer from one that aborted."""
    limit = assoc.dimse_timeout
    if limit is not None and waited >= limit:
        return f"no C-STORE response within {limit:g}s (dimse timeout): the association was aborted"
    return f"no C-STORE response: the peer aborted the association or closed the connection {waited:.1f}s after the request"


def _sop_name(item: _FileToSend) -> str:
    name = UID(item.sop_class_uid).name
    return f"{name} ({item.sop_class_uid})" if name != item.sop_class_uid else item.sop_class_uid


def _refusal(assoc: Association, item: _FileToSend) -> str:
    """Why no accepted presentation context fits `item`, from the peer's answers to the ones offered."""
    results = sorted({_CONTEXT_RESULTS.get(cx.result, f"result {cx.result}") for cx in assoc.rejected_contexts
                      if cx.abstract_syntax == item.sop_class_uid})
    why = f": {', '.join(results)}" if results else ""
    return f"refused at association: the peer accepted no presentation context for {_sop_name(item)}{why}"
