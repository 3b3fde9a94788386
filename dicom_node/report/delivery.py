"""Durable delivery of reports to the PACS: an outbox in the index database, retried until accepted.

`enqueue` writes the object to disk (fsync, then link into place) and one row per configured
destination, in that order, so a row never points at a missing file. `deliver_due` tries each
due row once: C-STORE (one association per destination per call, every response status checked)
or STOW-RS. A failure records the error and schedules the next attempt with exponential backoff
and jitter; rows stay until the destination accepts them, across restarts. Sending the same
object twice is harmless (same SOP Instance UID), so a crash between the PACS's answer and the
database update only costs a duplicate send, never a lost report.

With `storage_commitment` on a C-STORE destination, an accepted row then asks the PACS to commit
(N-ACTION); the PACS answers later on an association of its own (N-EVENT-REPORT), which the node's
SCP hands to `DeliveryQueue.handle_commitment_report`. A failed commitment sends the object again.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from sqlalchemy import func, select, update

from .. import audit, identity
from ..index import Index, _insert, report_deliveries
from ..logs import log_event
from ..netutil import client_tls_context, https_session
from ..scu import AssociationFailed, Peer, associate
from ..storage import InstanceStore, StoreOutcome
from .settings import Destination, ReportSettings

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance of the Push Model

DONE = ("accepted", "committed")


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    destination: str
    path: str
    status: str
    created_at: float
    attempts: int
    next_attempt_at: float
    last_attempt_at: float | None
    last_error: str
    response_status: int | None
    accepted_at: float | None
    commitment_uid: str | None
    committed_at: float | None


@dataclass
class DeliverySummary:
    attempted: int = 0
    accepted: int = 0
    failed: int = 0
    warnings: int = 0
    commitments_requested: int = 0
    started_at: float = 0.0  # the `now` of this run: attempts are recorded and retries scheduled from it
    errors: list[str] = field(default_factory=list)  # "destination: SOP Instance UID: error"


def _status_text(code: int) -> str:
    if code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return "warning"
    if code == 0x0000:
        return "success"
    return "failure"


_FAILURE_MEANINGS = {
    0x0110: "processing failure", 0x0111: "duplicate SOP instance", 0x0117: "invalid object instance",
    0x0122: "SOP class not supported", 0x0124: "not authorised", 0x0211: "unrecognised operation",
    0xA700: "out of resources", 0xA900: "dataset does not match SOP class",
}


def _describe(code: int, comment: str) -> str:
    meaning = _FAILURE_MEANINGS.get(code) or ("out of resources" if code & 0xFF00 == 0xA700
                                              else "cannot understand" if code & 0xF000 == 0xC000 else "failure")
    return f"status 0x{code:04X} ({meaning}){': ' + comment if comment else ''}"


class DeliveryQueue:
    def __init__(self, index: Index, store_dir: Path, settings: ReportSettings, ae_title: str = "DICOM_NODE",
                 rng: random.Random | None = None) -> None:
        self.index = index
        self.settings = settings
        self.ae_title = ae_title  # our calling AE title (Settings.ae_title)
        self.store = InstanceStore(Path(store_dir), duplicate_policy="keep_first")
        self.store.remove_partial_writes()  # of processes that are gone: other workers may be writing
        self.rng = rng or random.Random()

    # --- outbox -----------------------------------------------------------------------------

    def enqueue(self, ds: Dataset, now: float | None = None) -> list[DeliveryRow]:
        """Write `ds` durably and queue it for every destination; the same SOP Instance UID again
        changes nothing (the first file is kept) except adding rows for destinations added since."""
        now = time.time() if now is None else now
        sop_uid, study_uid = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
        path = self.store.path_for(study_uid, str(ds.SeriesInstanceUID), sop_uid)
        if not path.exists():
            result = self.store.store(study_uid, str(ds.SeriesInstanceUID), sop_uid, _encode(ds))
            if result.outcome not in (StoreOutcome.STORED, StoreOutcome.DUPLICATE_IDENTICAL, StoreOutcome.CONFLICT_KEPT_FIRST):
                raise RuntimeError(f"could not write {path}: {result.outcome.value}")
        if not self.settings.destinations:
            log_event(log, logging.WARNING, "report.no_destinations", sop_instance_uid=sop_uid, path=str(path))
        with self.index._write() as conn:  # noqa: SLF001 (the index's one-writer lock for SQLite)
            for dest in self.settings.destinations:
                conn.execute(
                    _insert(conn, report_deliveries)
                    .values(sop_instance_uid=sop_uid, sop_class_uid=str(ds.SOPClassUID), study_uid=study_uid,
                            destination=dest.name, path=str(path), status="pending", created_at=now,
                            attempts=0, next_attempt_at=now, last_error="")
                    .on_conflict_do_nothing(index_elements=["sop_instance_uid", "destination"])
                )
        log_event(log, logging.INFO, "report.queued", sop_instance_uid=sop_uid, study_uid=study_uid,
                  destinations=[d.name for d in self.settings.destinations])
        return [row for row in self.rows() if row.sop_instance_uid == sop_uid]

    def rows(self) -> list[DeliveryRow]:
        with self.index.engine.connect() as conn:
            return [DeliveryRow(**r._mapping) for r in conn.execute(select(report_deliveries).order_by(report_deliveries.c.id))]

    def pending(self) -> list[DeliveryRow]:
        """Everything not yet accepted (or not yet committed), with its last error."""
        return [row for row in self.rows() if row.status not in DONE]

    def counts(self) -> dict[str, int]:
        return delivery_counts(self.index)

    # --- delivery ---------------------------------------------------------------------------

    def backoff(self, attempts: int) -> float:
        """Delay before the next try after `attempts` failed ones: base * 2^(n-1), capped, with jitter."""
        s = self.settings
        delay = min(s.backoff_max_seconds, s.backoff_base_seconds * 2 ** max(attempts - 1, 0))
        return max(0.0, delay * (1 + self.rng.uniform(-s.backoff_jitter, s.backoff_jitter)))

    def deliver_due(self, now: float | None = None, only: Collection[str] | None = None) -> DeliverySummary:
        """Try every due row once; `only`: just the rows of these SOP Instance UIDs (one job's objects,
        so that job never waits on another worker's claim of them)."""
        now = time.time() if now is None else now
        summary = DeliverySummary(started_at=now)
        destinations = {d.name: d for d in self.settings.destinations}
        self._expire_commitments(summary)
        due = self._claim_due(now, only)
        by_destination: dict[str, list[DeliveryRow]] = {}
        for row in due:
            by_destination.setdefault(row.destination, []).append(row)
        for name, rows in by_destination.items():
            dest = destinations.get(name)
            if dest is None:
                for row in rows:
                    self._failed(row, f"destination {name!r} is no longer configured (report.destinations)", None, summary)
                continue
            if dest.kind == "stow-rs":
                self._deliver_stow(dest, rows, summary)
            else:
                self._deliver_cstore(dest, rows, summary)
        return summary

    def _expire_commitments(self, summary: DeliverySummary) -> None:
        """A commitment the PACS never answered is not a delivery: send the object again."""
        timeout, now = self.settings.commitment_timeout_seconds, summary.started_at
        error = (f"no Storage Commitment result within {timeout:g}s (is this node's AE title, host and port "
                 "registered in the PACS for the answer?); sending again")
        with self.index._write() as conn:  # noqa: SLF001
            expired = conn.execute(
                select(report_deliveries.c.id, report_deliveries.c.destination, report_deliveries.c.sop_instance_uid)
                .where(report_deliveries.c.status == "committing", report_deliveries.c.last_attempt_at + timeout <= now)
            ).all()
            for row in expired:
                conn.execute(update(report_deliveries).where(report_deliveries.c.id == row.id)
                             .values(status="pending", commitment_uid=None, next_attempt_at=now, last_error=error))
                summary.errors.append(f"{row.destination}: {row.sop_instance_uid}: {error}")
                log_event(log, logging.WARNING, "report.commitment_expired", destination=row.destination,
                          sop_instance_uid=row.sop_instance_uid)

    def _claim_due(self, now: float, only: Collection[str] | None = None) -> list[DeliveryRow]:
        """Due rows, each leased for a while so a concurrent worker does not send them too."""
        lease = now + max((d.timeout_seconds for d in self.settings.destinations), default=30.0) * 4
        claimed = []
        query = (select(report_deliveries)
                 .where(report_deliveries.c.status == "pending", report_deliveries.c.next_attempt_at <= now)
                 .order_by(report_deliveries.c.id))
        if only is not None:
            query = query.where(report_deliveries.c.sop_instance_uid.in_(list(only)))
        with self.index._write() as conn:  # noqa: SLF001
            rows = conn.execute(query).all()
            for r in rows:
                got = conn.execute(
                    update(report_deliveries)
                    .where(report_deliveries.c.id == r.id, report_deliveries.c.next_attempt_at == r.next_attempt_at)
                    .values(next_attempt_at=lease)
                ).rowcount
                if got:
                    claimed.append(DeliveryRow(**r._mapping))
        return claimed

    def _update(self, row_id: int, **values) -> None:
        with self.index._write() as conn:  # noqa: SLF001
            conn.execute(update(report_deliveries).where(report_deliveries.c.id == row_id).values(**values))

    def _accepted(self, row: DeliveryRow, status: int, warning: str, summary: DeliverySummary) -> None:
        now = summary.started_at
        summary.attempted += 1
        summary.accepted += 1
        if warning:
            summary.warnings += 1
            log_event(log, logging.WARNING, "report.delivered_with_warning", destination=row.destination,
                      sop_instance_uid=row.sop_instance_uid, status=f"0x{status:04X}", warning=warning)
        else:
            log_event(log, logging.INFO, "report.delivered", destination=row.destination, sop_instance_uid=row.sop_instance_uid)
        self._update(row.id, status="accepted", attempts=row.attempts + 1, last_attempt_at=now, accepted_at=now,
                     response_status=status, last_error=warning)
        audit.record_access(self.index, audit.REPORT_SENT, row.study_uid, peer=row.destination, detail=f"SR {row.sop_instance_uid}")

    def _failed(self, row: DeliveryRow, error: str, status: int | None, summary: DeliverySummary) -> None:
        now = summary.started_at
        attempts = row.attempts + 1
        delay = self.backoff(attempts)
        summary.attempted += 1
        summary.failed += 1
        summary.errors.append(f"{row.destination}: {row.sop_instance_uid}: {error}")
        log_event(log, logging.WARNING, "report.delivery_failed", destination=row.destination,
                  sop_instance_uid=row.sop_instance_uid, attempts=attempts, retry_in_s=round(delay, 1), error=error)
        self._update(row.id, status="pending", attempts=attempts, last_attempt_at=now, next_attempt_at=now + delay,
                     last_error=error, response_status=status)

    # --- C-STORE ----------------------------------------------------------------------------

    def _ae(self, dest: Destination) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_seconds
        ae.connection_timeout = dest.timeout_seconds
        return ae

    def _tls(self, dest: Destination):
        if dest.tls is None:
            return None
        return client_tls_context(dest.tls.ca, dest.tls.cert, dest.tls.key, check_hostname=dest.tls.check_hostname)

    def _deliver_cstore(self, dest: Destination, rows: list[DeliveryRow], summary: DeliverySummary) -> None:
        datasets: dict[int, Dataset] = {}
        for row in rows:
            try:
                datasets[row.id] = dcmread(row.path)
            except (OSError, ValueError) as exc:
                self._failed(row, f"cannot read the queued file {row.path}: {exc}", None, summary)
        rows = [row for row in rows if row.id in datasets]
        if not rows:
            return
        ae = self._ae(dest)
        for sop_class in sorted({row.sop_class_uid for row in rows}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if dest.storage_commitment:
            ae.add_requested_context(StorageCommitmentPushModel)
        # Always offered too, so a PACS that refuses every report SOP class still accepts the association
        # and the refusal is reported per SOP class instead of as an unexplained abort.
        ae.add_requested_context(Verification)
        peer = Peer(dest.host, dest.port, dest.ae_title)
        try:
            assoc = associate(ae, peer, self._tls(dest))
        except AssociationFailed as exc:
            for row in rows:
                self._failed(row, str(exc), None, summary)
            return
        accepted: list[DeliveryRow] = []
        try:
            for row in rows:
                if not assoc.is_established:
                    self._failed(row, f"association with {dest.name} lost before this object was sent", None, summary)
                    continue
                try:
                    status_ds = assoc.send_c_store(datasets[row.id])
                except ValueError:  # no accepted presentation context for this SOP class
                    self._failed(row, f"{dest.name} ({dest.ae_title}) does not accept SOP class "
                                      f"{UID(row.sop_class_uid).name} ({row.sop_class_uid}): presentation context "
                                      "rejected; configure the PACS to accept it", None, summary)
                    continue
                except (RuntimeError, OSError) as exc:
                    self._failed(row, f"C-STORE to {dest.name} failed: {exc}", None, summary)
                    continue
                if not status_ds or "Status" not in status_ds:
                    self._failed(row, f"no C-STORE response from {dest.name} within {dest.timeout_seconds:g}s "
                                      "(timeout or association aborted mid-transfer)", None, summary)
                    continue
                code = int(status_ds.Status)
                comment = str(status_ds.get("ErrorComment", ""))
                kind = _status_text(code)
                if kind == "failure":
                    self._failed(row, f"{dest.name} refused the object: {_describe(code, comment)}", code, summary)
                    continue
                warning = f"status 0x{code:04X} (warning){': ' + comment if comment else ''}" if kind == "warning" else ""
                self._accepted(row, code, warning, summary)
                accepted.append(row)
            if dest.storage_commitment and accepted and assoc.is_established:
                self._request_commitment(assoc, dest, accepted, summary)
        finally:
            if assoc.is_established:
                assoc.release()

    # --- Storage Commitment -----------------------------------------------------------------

    def _request_commitment(self, assoc, dest: Destination, rows: list[DeliveryRow], summary: DeliverySummary) -> None:
        transaction_uid = generate_uid(prefix=identity.UID_ROOT)
        request = Dataset()
        request.TransactionUID = transaction_uid
        request.ReferencedSOPSequence = []
        for row in rows:
            item = Dataset()
            item.ReferencedSOPClassUID = row.sop_class_uid
            item.ReferencedSOPInstanceUID = row.sop_instance_uid
            request.ReferencedSOPSequence.append(item)
        try:
            status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
        except ValueError as exc:
            error = f"{dest.name} does not support Storage Commitment (presentation context rejected: {exc})"
            status = None
        else:
            code = int(status.Status) if status and "Status" in status else None
            error = "" if code == 0 else f"storage commitment request not accepted by {dest.name}: " + (
                "no response (the PACS aborted: is this node's AE title registered there, with host and port "
                "for the answer?)" if code is None else f"status 0x{code:04X}")
        for row in rows:
            if error:
                # Stored but not committed: visible, and the object is sent again with its commitment later.
                self._update(row.id, status="pending", next_attempt_at=summary.started_at + self.backoff(row.attempts + 1),
                             last_error=error)
                summary.errors.append(f"{dest.name}: {row.sop_instance_uid}: {error}")
            else:
                self._update(row.id, status="committing", commitment_uid=transaction_uid)
        if not error:
            summary.commitments_requested += 1
            log_event(log, logging.INFO, "report.commitment_requested", destination=dest.name,
                      transaction_uid=transaction_uid, count=len(rows))

    def handle_commitment_report(self, event) -> int:
        """pynetdicom EVT_N_EVENT_REPORT handler (bind it in the node's SCP, which must accept the Storage
        Commitment Push Model with the SCP role for the PACS): committed rows are done, failed ones resent."""
        if event.request.AffectedSOPClassUID != StorageCommitmentPushModel:
            return 0x0112  # No such SOP Instance
        report = event.event_information
        transaction_uid = str(report.get("TransactionUID", ""))
        committed = {str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])}
        failed = {str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0)) for i in report.get("FailedSOPSequence", [])}
        now = time.time()
        with self.index._write() as conn:  # noqa: SLF001
            rows = conn.execute(select(report_deliveries).where(report_deliveries.c.commitment_uid == transaction_uid)).all()
            for row in rows:
                if row.sop_instance_uid in committed:
                    values = dict(status="committed", committed_at=now, last_error="")
                else:
                    reason = failed.get(row.sop_instance_uid)
                    values = dict(status="pending", next_attempt_at=now, commitment_uid=None,
                                  last_error="storage commitment failed" + (f": reason 0x{reason:04X}" if reason else
                                                                            ": not listed in the commitment report"))
                conn.execute(update(report_deliveries).where(report_deliveries.c.id == row.id).values(**values))
        log_event(log, logging.INFO if not failed else logging.WARNING, "report.commitment_report",
                  transaction_uid=transaction_uid, committed=len(committed), failed=len(failed), known_rows=len(rows))
        return 0x0000

    # --- STOW-RS ----------------------------------------------------------------------------

    def _deliver_stow(self, dest: Destination, rows: list[DeliveryRow], summary: DeliverySummary) -> None:
        from dicomweb_client import DICOMwebClient

        if dest.tls is not None:
            session = https_session(dest.tls.ca, dest.tls.cert, dest.tls.key, check_hostname=dest.tls.check_hostname)
        else:
            session = requests.Session()
        client = DICOMwebClient(url=dest.stow_url.rstrip("/"), session=session, timeout=dest.timeout_seconds)
        for row in rows:
            try:
                response = client.store_instances([dcmread(row.path)])
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else None
                body = (exc.response.text[:200] if exc.response is not None else "").strip()
                self._failed(row, f"STOW-RS to {dest.stow_url} failed: HTTP {code} {body}".strip(), code, summary)
                continue
            except (requests.RequestException, OSError, ValueError) as exc:
                self._failed(row, f"STOW-RS to {dest.stow_url} failed: {exc}", None, summary)
                continue
            failed = [i for i in response.get("FailedSOPSequence", []) if i.get("ReferencedSOPInstanceUID") == row.sop_instance_uid]
            if failed:
                reason = int(failed[0].get("FailureReason", 0))
                self._failed(row, f"STOW-RS: {dest.name} refused the object: {_describe(reason, '')}", reason, summary)
                continue
            warnings = [int(i.WarningReason) for i in response.get("ReferencedSOPSequence", []) if "WarningReason" in i]
            self._accepted(row, 0, f"STOW-RS warning 0x{warnings[0]:04X}" if warnings else "", summary)


def delivery_counts(index: Index) -> dict[str, int]:
    """Deliveries by status (pending, committing, accepted, committed), for status pages."""
    with index.engine.connect() as conn:
        rows = conn.execute(select(report_deliveries.c.status, func.count()).group_by(report_deliveries.c.status)).all()
    return {status: count for status, count in rows}


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
