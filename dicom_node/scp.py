"""The node's DICOM front door: C-ECHO and C-STORE SCP (pynetdicom), access control and audit."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification, register_uid
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import ThreadedAssociationServer

from . import gil_held, recovery
from .assembly import Assembler
from .config import Settings
from .connection_counts import Counts, CountsUnavailable
from .connection_handoff import Handoff, receive_connections
from .frontdoor import FrontDoor, Limits, Refusal, ingest_received
from .http_api import ASSOCIATIONS, INSTANCES, StatusServer
from .index import Index
from .ingest import MEDIA_STORAGE_DIRECTORY, Ingestor
from .logs import log_event
from .netutil import ACCEPTED_TRANSFER_SYNTAXES, CONNECTION_HANDLER, server_tls_context
from .storage import InstanceStore
from .throttle import RefusalThrottle, suppressed_note

log = logging.getLogger(__name__)


# pynetdicom aborts on a DICOMDIR C-STORE (no service class); route it to our handler so the
# sender gets a status saying why it is refused.
register_uid(MEDIA_STORAGE_DIRECTORY, "MediaStorageDirectoryOverNetwork", StorageServiceClass)

# Retired storage SOP classes that archives still hold (US Image Storage 1.2.840.10008.5.1.4.1.1.6,
# NM, US multi-frame, the SR trials, standalone curves and LUTs...): pynetdicom knows none of
# them; DCMTK's storescp and Orthanc accept them. Stored and indexed like any other instance.
RETIRED_STORAGE_CLASSES = tuple(
    uid
    for uid, (name, kind, _, retired, _keyword) in UID_dictionary.items()
    if kind == "SOP Class" and retired == "Retired" and "Storage" in name and "Commitment" not in name
)
for _uid in RETIRED_STORAGE_CLASSES:
    if uid_to_service_class(_uid) is not StorageServiceClass:
        register_uid(_uid, UID_dictionary[_uid][4] or f"RetiredStorage{_uid.replace('.', '_')}", StorageServiceClass)

# A-ASSOCIATE-RJ (result, source, diagnostic)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit exceeded
UNLIMITED_ASSOCIATIONS = 1 << 30


@dataclass
class _AssociationStats:
    audit_id: int
    received: int = 0
    failures: int = 0
    last_failure: str = ""
    abort_reason: str = ""  # why the front door cut the association, if it did


def caller_allowed(allowed: list[str], calling_ae: str, host: str) -> bool:
    """Entries are "AE" (from anywhere) or "AE@host"; an empty list allows every caller."""
    if not allowed:
        return True
    for entry in allowed:
        ae_title, _, entry_host = entry.partition("@")
        if ae_title.strip() == calling_ae and (not entry_host or entry_host == host):
            return True
    return False


@dataclass
class DicomNode:
    """The SCP process: listeners, ingest, and the study assembler.

    `listener_only`: one of the extra SCP processes of `scp_processes` (scp_processes.py): its own
    listeners, serving the connections the first process passes it, ingest and index connection;
    no assembler, status page or start-up clean-up (those belong to the first process)."""

    settings: Settings
    listener_only: bool = False
    counts: Counts | None = None  # an extra SCP process: the first process's counts (connection_counts.py)
    passed_connections: socket.socket | None = None  # an extra SCP process: its link from the first one
    on_link_lost: Callable[[], None] | None = None  # an extra SCP process: that link ended
    index: Index = field(init=False)
    store: InstanceStore = field(init=False)
    ingestor: Ingestor = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.store = InstanceStore(s.storage_dir, s.min_free_disk_mb * 2**20, s.duplicate_policy)
        self.index = Index(s.database_url, fast_instance_commits=s.index_instance_commit == "fast")
        self.ingestor = Ingestor(self.store, self.index, group_commit=True)
        self._stats: dict[int, _AssociationStats] = {}
        self._stats_lock = threading.Lock()
        self._servers: list[ThreadedAssociationServer] = []
        self._assembler: Assembler | None = None
        self._status: StatusServer | None = None
        self._delivery_queue = None  # built on the first Storage Commitment report
        self._refusal_throttle = RefusalThrottle(s.refusal_audit_limit, s.refusal_audit_window_seconds)
        self.ae = self._build_ae()
        self.front_door = FrontDoor(
            Limits(
                acse_timeout=s.acse_timeout,
                network_timeout=s.network_timeout,
                max_pdu_size=s.max_pdu_size,
                max_connections_per_host=s.max_connections_per_host,
                spool_dir=self.store.incoming,  # C-STORE data sets are streamed to a file there
                max_associations=s.max_associations,
            ),
            self._on_refusal,
            self.counts,
            Handoff() if s.scp_processes > 1 and not self.listener_only else None,
        )

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        lock = self.index.write_lock_path
        gil_held.use_for(self.store.root, *([Path(lock).parent] if lock else []))
        if not self.listener_only:
            self.store.remove_partial_writes()  # before any process of this node listens
            if recovery.begin_run(self.store.root):
                recovery.restore_missing_rows(self.ingestor)  # rows a power loss may have taken back
        self.index.warm_up()  # compiled now, not on the first modality's association
        handlers = self._handlers()
        if s.http_port and not self.listener_only:  # first: a port in use stops the node before it accepts images
            self._status = StatusServer(self.index, s.http_host, s.http_port, s)
            self._status.start()
        passed_only = self.listener_only  # an extra process serves what the first one accepted
        if s.port:  # 0: TLS only, no plain listener
            self._servers.append(self.front_door.serve(self.ae, (s.host, s.port), handlers, passed_only=passed_only))
        if s.tls_enabled:
            if not (s.tls_cert and s.tls_key):
                raise ValueError("tls_enabled needs tls_cert and tls_key")
            context = server_tls_context(s.tls_cert, s.tls_key, s.tls_ca, s.tls_require_client_cert)
            self._servers.append(self.front_door.serve(self.ae, (s.host, s.tls_port), handlers, ssl_context=context, passed_only=passed_only))
        if self.listener_only:
            assert self.passed_connections is not None, "an extra SCP process needs its link from the first"
            receive_connections(self.passed_connections, self._serve_passed, self.on_link_lost)
            log_event(log, logging.INFO, "scp.serving_passed_connections")  # an extra SCP process
            return
        self._assembler = Assembler(self.index, s)
        self._assembler.start()
        if not s.allowed_callers:
            log_event(log, logging.WARNING, "scp.open_to_any_caller", hint="set DICOM_NODE_ALLOWED_CALLERS")
        log_event(
            log,
            logging.INFO,
            "scp.listening",
            ae_title=s.ae_title,
            host=s.host,
            port=s.port or None,  # None: TLS only
            tls_port=s.tls_port if s.tls_enabled else None,
            storage_dir=str(s.storage_dir),
        )

    def _serve_passed(self, listener: str, connection: socket.socket, address: tuple[str, int]) -> None:
        """A connection the first process admitted for this one; if it cannot be served, its
        count is released here (it was counted for this process)."""
        try:
            servers = [server for server in self._servers if server.listener == listener]
            if not servers:
                raise LookupError(f"no {listener} listener in this process")
            servers[0].serve_passed(connection, address)
        except BaseException:
            self.front_door.release(address[0])
            raise

    def stop(self) -> None:
        if self._assembler:
            self._assembler.stop()
            self._assembler.join(timeout=5)
        for server in self._servers:
            server.shutdown()
        self._servers.clear()
        self._flush_refusal_counts()
        if self._status:
            self._status.stop()
            self._status = None
        if not self.listener_only:
            recovery.end_run(self.store.root)  # after the listeners: every row written
        self.index.dispose()
        gil_held.stop_using()

    # --- wiring -----------------------------------------------------------------------

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        # max_associations is the front door's (associated connections only): pynetdicom's own
        # limit counts every connection's thread, silent ones included.
        ae.maximum_associations = UNLIMITED_ASSOCIATIONS
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_pdu_size = s.max_pdu_size
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        for uid in RETIRED_STORAGE_CLASSES:
            ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
        # Accepted only so a sender gets a clear refusal status rather than a bare context rejection.
        ae.add_supported_context(MEDIA_STORAGE_DIRECTORY, ACCEPTED_TRANSFER_SYNTAXES)
        # The PACS answers Storage Commitment requests for delivered reports on an association of its own.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        return ae

    def _handlers(self) -> list:
        return [
            CONNECTION_HANDLER,
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_commitment_report),
        ]

    # --- access control and audit -----------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        if assoc.is_aborted:
            return  # the front door cut the connection before any A-ASSOCIATE-RQ (already audited)
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        called = assoc.requestor.primitive.called_ae_title.strip()
        host, port = assoc.requestor.address, assoc.requestor.port
        if not caller_allowed(self.settings.allowed_callers, calling, host):
            self._reject(assoc, REJECT_CALLING_AE, calling, called, host, port, f"calling AE {calling!r} from {host} is not allowed")
        elif self.settings.check_called_ae and called != self.settings.ae_title:
            self._reject(
                assoc, REJECT_CALLED_AE, calling, called, host, port, f"called AE {called!r} is not this node ({self.settings.ae_title!r})"
            )
        else:
            try:
                claimed = self.front_door.claim_association(assoc)
            except CountsUnavailable as exc:  # rather than an association the limit does not count
                self._reject(assoc, REJECT_LOCAL_LIMIT, calling, called, host, port,
                             f"connection limits unavailable: {exc}")
                return
            if not claimed:
                self._reject(
                    assoc, REJECT_LOCAL_LIMIT, calling, called, host, port,
                    f"local limit exceeded (max_associations: {self.settings.max_associations} associations open)",
                )

    def _reject(self, assoc, rsd: tuple[int, int, int], calling: str, called: str, host: str, port: int, reason: str) -> None:
        ASSOCIATIONS.labels("rejected").inc()
        write, carried, since = self._refusal_throttle.admit(host)
        if write:  # else a flood from this host: counted into its next audit row
            # Audit first: the peer may look at our status as soon as it has the rejection.
            audited = reason + (f"; {suppressed_note(carried, since)}" if carried else "")
            self.index.open_association(calling, called, host, port, "rejected", audited)
            log_event(log, logging.WARNING, "association.rejected", calling_ae=calling, called_ae=called, peer=f"{host}:{port}", reason=reason)
        assoc.acse.send_reject(*rsd)
        assoc.kill()  # waits until the rejection is on the wire before the socket closes

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejection in negotiation (e.g. protocol version); ours are audited in _reject.
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        reason = "rejected in association negotiation"
        self.index.open_association(
            primitive.calling_ae_title.strip(), primitive.called_ae_title.strip(), assoc.requestor.address, assoc.requestor.port, "rejected", reason
        )
        log_event(log, logging.WARNING, "association.rejected", calling_ae=primitive.calling_ae_title.strip(), reason=reason)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        audit_id = self.index.open_association(
            calling, assoc.acceptor.ae_title.strip(), assoc.requestor.address, assoc.requestor.port, "accepted"
        )
        with self._stats_lock:
            self._stats[id(assoc)] = _AssociationStats(audit_id)
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        log_event(log, logging.INFO, "association.accepted", calling_ae=calling, peer=peer, audit_id=audit_id)
        if assoc.rejected_contexts:
            log_event(
                log,
                logging.WARNING,
                "association.contexts_refused",
                calling_ae=calling,
                peer=peer,
                audit_id=audit_id,
                accepted=len(assoc.accepted_contexts),
                refused=[_describe_refused(cx) for cx in assoc.rejected_contexts],
            )

    def _on_released(self, event: evt.Event) -> None:
        self._close(event, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._close(event, "aborted")

    def _close(self, event: evt.Event, result: str) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return  # rejected before acceptance: already audited
        ASSOCIATIONS.labels(result).inc()
        reason = stats.abort_reason or stats.last_failure
        self.index.close_association(stats.audit_id, result, stats.received, stats.failures, reason)
        log_event(
            log,
            logging.INFO,
            f"association.{result}",
            audit_id=stats.audit_id,
            received=stats.received,
            failures=stats.failures,
        )

    def _on_refusal(self, refusal: Refusal) -> None:
        """A connection the front door refused (per-host limit, TLS) or cut (deadline, PDU size)."""
        peer = f"{refusal.host}:{refusal.port}"
        with self._stats_lock:
            stats = self._stats.get(id(refusal.assoc)) if refusal.assoc is not None else None
            if stats is not None:
                stats.abort_reason = refusal.reason  # written to its audit row when it closes
        admitted = (True, 0, 0.0) if stats is not None else self._refusal_throttle.admit(refusal.host)
        if not admitted[0]:
            ASSOCIATIONS.labels(refusal.result).inc()
            return  # a flood from this host: counted into its next audit row, neither logged nor audited
        log_event(
            log,
            logging.WARNING,
            f"connection.{refusal.result}",
            peer=peer,
            calling_ae=refusal.calling_ae,
            audit_id=stats.audit_id if stats else None,
            reason=refusal.reason,
        )
        if stats is not None:
            return
        ASSOCIATIONS.labels(refusal.result).inc()
        _, carried, since = admitted
        reason = refusal.reason + (f"; {suppressed_note(carried, since)}" if carried else "")
        # Not accepted: the audit row is written ended.
        self.index.open_association(refusal.calling_ae, refusal.called_ae, refusal.host, refusal.port, refusal.result, reason)

    def _flush_refusal_counts(self) -> None:
        for host, count, since in self._refusal_throttle.drain():
            self.index.open_association("", "", host, 0, "rejected", suppressed_note(count, since))

    # --- services ---------------------------------------------------------------------

    def _on_commitment_report(self, event: evt.Event) -> int:
        if self._delivery_queue is None:
            from .pipeline.reporting import queue_for

            self._delivery_queue = queue_for(self.settings, self.index)
        return self._delivery_queue.handle_commitment_report(event)

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset | int:
        result = ingest_received(self.ingestor, event)
        INSTANCES.labels("accepted" if result.ok else f"0x{result.status:04X}").inc()
        with self._stats_lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                if result.ok:
                    stats.received += 1
                else:
                    stats.failures += 1
                    stats.last_failure = result.message
        return result.response()


CONTEXT_RESULTS = {0x01: "user rejection", 0x02: "no reason", 0x03: "abstract syntax not supported", 0x04: "transfer syntaxes not supported"}


def _describe_refused(cx) -> str:
    uid = str(cx.abstract_syntax)
    name = UID_dictionary.get(uid, (uid,))[0]
    syntaxes = ",".join(str(ts) for ts in cx.transfer_syntax or [])
    return f"{uid} ({name}): {CONTEXT_RESULTS.get(cx.result, f'result {cx.result}')}" + (f" [{syntaxes}]" if syntaxes else "")
