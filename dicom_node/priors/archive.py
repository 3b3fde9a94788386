"""Talking to archives: C-FIND / C-MOVE / C-GET (pynetdicom) and QIDO-RS / WADO-RS (dicomweb-client).

An archive that is down, refuses the association or drops it raises ArchiveUnavailable
(transient: the pipeline retries the job by time, pipeline/retry.py; nothing retries here).
A C-MOVE destination the archive does not know (0xA801) raises RetrieveRefused at once
(retrying cannot fix a PACS configuration).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import TypeVar

import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from ..config import Settings
from ..frontdoor import SpoolOnly, ingest_received, spool_received_datasets
from ..index import Index
from ..ingest import Ingestor
from ..logs import log_event
from ..netutil import client_tls_context, https_session
from ..netutil import ACCEPTED_TRANSFER_SYNTAXES
from ..scu import AssociationFailed, Peer, associate
from .model import (
    ArchiveUnavailable,
    MalformedResponse,
    RetrieveRefused,
    SeriesRecord,
    StudyRecord,
)
from .settings import ArchiveConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

PENDING = (0xFF00, 0xFF01)
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPS_FAILED_WARNING = 0xB000
MAX_GET_STORAGE_CONTEXTS = 127  # 128 presentation contexts at most, one is the C-GET model itself

STUDY_KEYS = (
    "StudyInstanceUID", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription", "SeriesNumber", "ViewPosition",
    "Laterality", "ImageLaterality", "Manufacturer", "NumberOfSeriesRelatedInstances",
)
INSTANCE_KEYS = ("SOPInstanceUID", "SOPClassUID")


class _Lost(Exception):
    """The association dropped or the archive stopped answering mid-operation (transient)."""


class _MoveFailedEarly(Exception):
    def __init__(self, transfer: Transfer) -> None:
        super().__init__("C-MOVE failed before any sub-operation")
        self.transfer = transfer


@dataclass
class Transfer:
    """Outcome of retrieving one series."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: int | None = None
    failed_uids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --- parsing archive answers -------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception as exc:  # an undecodable element is as good as absent, but say which
        raise MalformedResponse(f"{keyword} cannot be decoded: {exc}") from exc
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _values(ds: Dataset, keyword: str) -> frozenset[str]:
    return frozenset(v.strip().upper() for v in _text(ds, keyword).split("\\") if v.strip())


def _count(ds: Dataset, keyword: str) -> int | None:
    text = _text(ds, keyword)
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    uid = _text(ds, keyword)
    if not uid or len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid):
        raise MalformedResponse(f"{keyword} missing or not a UID: {uid!r}")
    return uid


def parse_study(ds: Dataset | None, archive: str) -> StudyRecord:
    if ds is None:
        raise MalformedResponse("undecodable identifier")
    return StudyRecord(
        study_uid=_uid(ds, "StudyInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID"),
        birth_date=_text(ds, "PatientBirthDate"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        description=_text(ds, "StudyDescription"),
        modalities=_values(ds, "ModalitiesInStudy"),
        archive=archive,
        instance_count=_count(ds, "NumberOfStudyRelatedInstances"),
    )


def parse_series(ds: Dataset | None) -> SeriesRecord:
    if ds is None:
        raise MalformedResponse("undecodable identifier")
    return SeriesRecord(
        series_uid=_uid(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        description=_text(ds, "SeriesDescription"),
        number=_text(ds, "SeriesNumber"),
        views=_values(ds, "ViewPosition"),
        lateralities=_values(ds, "Laterality") | _values(ds, "ImageLaterality"),
        manufacturer=_text(ds, "Manufacturer"),
        instance_count=_count(ds, "NumberOfSeriesRelatedInstances"),
    )


def parse_instance(ds: Dataset | None) -> tuple[str, str]:
    if ds is None:
        raise MalformedResponse("undecodable identifier")
    return _uid(ds, "SOPInstanceUID"), _uid(ds, "SOPClassUID")


def _query(level: str, keys: tuple[str, ...], **matching: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keys:
        setattr(ds, keyword, "")
    for keyword, value in matching.items():
        setattr(ds, keyword, value)
    return ds


@dataclass
class Answers:
    """Parsed answers of one query, plus those that could not be used (and why)."""

    records: list = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


# --- the archive interface ---------------------------------------------------------------------


class Archive:
    """Query and retrieve from one configured archive; subclasses speak DIMSE or DICOMweb."""

    def __init__(self, config: ArchiveConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.name = config.name

    def _retry(self, what: str, operation: Callable[[], T]) -> T:
        """One attempt; a transient failure becomes ArchiveUnavailable, retried later by the pipeline."""
        try:
            return operation()
        except (AssociationFailed, _Lost, requests.ConnectionError, requests.Timeout) as exc:
            self.close()
            log_event(log, logging.WARNING, "priors.archive_unavailable", archive=self.name, operation=what, error=str(exc))
            raise ArchiveUnavailable(f"archive {self.name!r}: {what} failed: {exc}") from exc

    def find_studies(self, patient_id: str, issuer: str, date_range: str) -> Answers:
        return self._retry("study query", lambda: self._find_studies(patient_id, issuer, date_range))

    def find_series(self, study_uid: str) -> Answers:
        return self._retry("series query", lambda: self._find_series(study_uid))

    def find_instances(self, study_uid: str, series_uid: str) -> Answers:
        return self._retry("instance query", lambda: self._find_instances(study_uid, series_uid))

    def retrieve_series(self, study_uid: str, series_uid: str, sop_classes: set[str], ingestor: Ingestor) -> Transfer:
        return self._retry("retrieve", lambda: self._retrieve(study_uid, series_uid, sop_classes, ingestor))

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    # subclasses
    def _find_studies(self, patient_id: str, issuer: str, date_range: str) -> Answers:
        raise NotImplementedError

    def _find_series(self, study_uid: str) -> Answers:
        raise NotImplementedError

    def _find_instances(self, study_uid: str, series_uid: str) -> Answers:
        raise NotImplementedError

    def _retrieve(self, study_uid: str, series_uid: str, sop_classes: set[str], ingestor: Ingestor) -> Transfer:
        raise NotImplementedError


def open_archive(config: ArchiveConfig, settings: Settings, index: Index | None = None) -> Archive:
    if config.method == "dicomweb":
        return DicomWebArchive(config, settings)
    return DimseArchive(config, settings, index)


def quiesce_reactor(assoc: Association, settle_s: float = 0.003) -> None:
    """Make sure the association's reactor thread is parked before a request is sent.

    pynetdicom's send_c_find/move/get pause the reactor with a handshake that has a window: the
    reactor can pass its checkpoint just before it is cleared, then take the first response off
    the queue and drop it as unexpected. With TCP_NODELAY and fast loopback peers this loses a
    C-FIND pending answer every few dozen queries. Clearing the checkpoint ourselves and letting
    the reactor finish its current turn first closes that window (it can then only block).
    """
    assoc._reactor_checkpoint.clear()  # private: pynetdicom 3.0 has no public way to do this
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if assoc._is_paused:
            time.sleep(settle_s)  # releases the GIL: a reactor past its checkpoint runs its turn out
            if assoc._is_paused:
                return
        else:
            time.sleep(0.0001)


def _no_response(assoc: Association | None, what: str, started: float) -> _Lost:
    """Why a DIMSE exchange ended without a response: the archive dropped us, or it timed out."""
    waited = time.monotonic() - started
    timeout = assoc.dimse_timeout if assoc is not None and assoc.dimse_timeout else None
    if assoc is not None and (timeout is None or waited < 0.9 * timeout):
        return _Lost(
            f"the archive aborted the association during {what} after {waited:.1f}s: it may not accept this request "
            f"from calling AE {assoc.requestor.ae_title!r} (register the node's AE title in the PACS)"
        )
    return _Lost(f"no {what} response within {waited:.0f}s (archive too slow or the network is down)")


def _collect(answers: Answers, parse: Callable, items: Iterator[tuple[Dataset, Dataset | None]], what: str,
             assoc: Association | None = None) -> Answers:
    started = time.monotonic()
    for status, identifier in items:
        if not status:
            raise _no_response(assoc, what, started)
        code = int(status.Status)
        if code in PENDING:
            try:
                answers.records.append(parse(identifier))
            except MalformedResponse as exc:
                answers.malformed.append(str(exc))
        elif code == 0x0000:
            return answers
        elif code == 0xFE00:
            raise _Lost(f"{what} cancelled by the archive")
        else:
            comment = str(status.get("ErrorComment", "")).strip()
            raise _Lost(f"{what} failed with status 0x{code:04X} {comment}".strip())
    raise _Lost(f"{what}: the archive ended without a final status")


class DimseArchive(Archive):
    def __init__(self, config: ArchiveConfig, settings: Settings, index: Index | None = None) -> None:
        super().__init__(config, settings)
        self.index = index  # to read our SCP's association audit when a C-MOVE fails early
        self.peer = Peer(config.host, config.port, config.ae_title)
        self.calling_ae = config.calling_ae_title or settings.ae_title
        self.move_destination = config.move_destination or settings.ae_title
        self._assoc: Association | None = None
        self._get_state: tuple[Association, set[str], Ingestor, SpoolOnly] | None = None

    def _tls(self):
        c = self.config
        if not c.tls_enabled:
            return None
        return client_tls_context(c.tls_ca, c.tls_cert, c.tls_key, check_hostname=c.tls_check_hostname)

    def _ae(self, dimse_timeout: float) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.config.timeout_seconds
        ae.network_timeout = max(self.config.timeout_seconds, dimse_timeout)
        ae.dimse_timeout = dimse_timeout
        return ae

    def _query_assoc(self) -> Association:
        """One association for the C-FINDs and C-MOVEs of a run (reopened if it was lost)."""
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        ae = self._ae(self.config.retrieve_timeout_seconds)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        self._assoc = associate(ae, self.peer, self._tls())
        return self._assoc

    def close(self) -> None:
        self._release_get()
        if self._assoc is not None:
            if self._assoc.is_established:
                self._assoc.release()
            self._assoc = None

    def _find(self, query: Dataset, parse: Callable, what: str) -> Answers:
        assoc = self._query_assoc()
        quiesce_reactor(assoc)
        items = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        return _collect(Answers(), parse, items, what, assoc)

    def _find_studies(self, patient_id: str, issuer: str, date_range: str) -> Answers:
        matching = {"PatientID": patient_id, "StudyDate": date_range}
        if issuer:
            matching["IssuerOfPatientID"] = issuer
        query = _query("STUDY", STUDY_KEYS, **matching)
        return self._find(query, lambda ds: parse_study(ds, self.name), "C-FIND (STUDY)")

    def _find_series(self, study_uid: str) -> Answers:
        return self._find(_query("SERIES", SERIES_KEYS, StudyInstanceUID=study_uid), parse_series, "C-FIND (SERIES)")

    def _find_instances(self, study_uid: str, series_uid: str) -> Answers:
        query = _query("IMAGE", INSTANCE_KEYS, StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        return self._find(query, parse_instance, "C-FIND (IMAGE)")

    def _retrieve(self, study_uid: str, series_uid: str, sop_classes: set[str], ingestor: Ingestor) -> Transfer:
        identifier = _query("SERIES", (), StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        if self.config.method == "c-get":
            return self._get(identifier, sop_classes, ingestor)
        assoc = self._query_assoc()
        started = time.time()
        quiesce_reactor(assoc)
        responses = assoc.send_c_move(identifier, self.move_destination, StudyRootQueryRetrieveInformationModelMove)
        try:
            return self._track(responses, "C-MOVE", assoc)
        except _MoveFailedEarly as exc:
            return self._classify_early_failure(exc.transfer, started)

    def _get(self, identifier: Dataset, sop_classes: set[str], ingestor: Ingestor) -> Transfer:
        assoc = self._get_assoc(sop_classes, ingestor)
        quiesce_reactor(assoc)
        return self._track(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet), "C-GET", assoc)

    def _get_assoc(self, sop_classes: set[str], ingestor: Ingestor) -> Association:
        """One C-GET association (SCP role for the storage classes) serves every series of a run
        whose SOP classes it negotiated; callers pass the union of a prior's classes up front."""
        current = self._get_state
        if current and current[0].is_established and sop_classes <= current[1] and current[2] is ingestor:
            return current[0]
        self._release_get()
        classes = sorted(sop_classes)
        if len(classes) > MAX_GET_STORAGE_CONTEXTS:
            raise RetrieveRefused(f"archive {self.name!r}: {len(classes)} SOP classes, more than one C-GET association can carry")
        ae = self._ae(self.config.retrieve_timeout_seconds)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in classes:
            ae.add_requested_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        roles = [build_role(sop_class, scp_role=True) for sop_class in classes]

        def on_store(event: evt.Event) -> Dataset | int:
            return ingest_received(ingestor, event).response()  # as the SCP does

        assoc = associate(ae, self.peer, self._tls(), ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        # Received instances go to a file in the store's .incoming as they arrive, as on the SCP.
        spool = spool_received_datasets(assoc, ingestor.store.incoming)
        self._get_state = (assoc, set(sop_classes), ingestor, spool)
        return assoc

    def _release_get(self) -> None:
        if self._get_state is not None:
            if self._get_state[0].is_established:
                self._get_state[0].release()
            self._get_state[3].remove_leftovers()
            self._get_state = None

    def _track(self, responses, what: str, assoc: Association | None = None) -> Transfer:
        """Follow pending responses to the final status; classify it."""
        transfer = Transfer()
        started = time.monotonic()
        for status, identifier in responses:
            if not status:
                raise _no_response(assoc, what, started)
            started = time.monotonic()  # the timeout applies to each response
            code = int(status.Status)
            transfer.completed = int(status.get("NumberOfCompletedSuboperations", transfer.completed) or 0)
            transfer.failed = int(status.get("NumberOfFailedSuboperations", transfer.failed) or 0)
            transfer.warning = int(status.get("NumberOfWarningSuboperations", transfer.warning) or 0)
            if code in PENDING:
                continue
            transfer.status = code
            if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                failed = identifier.FailedSOPInstanceUIDList
                transfer.failed_uids = [str(u) for u in (failed if isinstance(failed, (list, tuple)) or type(failed).__name__ == "MultiValue" else [failed])]
            comment = str(status.get("ErrorComment", "")).strip()
            if code == 0x0000:
                return transfer
            if code == MOVE_DESTINATION_UNKNOWN:
                raise RetrieveRefused(self._destination_message(f"0x{code:04X} move destination unknown"))
            if what == "C-MOVE" and code & 0xF000 == 0xC000 and not (transfer.completed or transfer.failed or transfer.warning):
                raise _MoveFailedEarly(transfer)
            if code == SUBOPS_FAILED_WARNING or code == 0xFE00:
                transfer.problems.append(f"{what} ended with status 0x{code:04X}: {transfer.completed} completed, "
                                         f"{transfer.failed} failed, {transfer.warning} with warnings")
                return transfer
            if code & 0xF000 == 0xA000 and code != 0xA900:
                # A701/A702: out of resources (either side); worth another try later.
                raise _Lost(f"{what} failed with status 0x{code:04X} {comment}".strip())
            transfer.problems.append(f"{what} failed with status 0x{code:04X} {comment}: {transfer.completed} completed, "
                                     f"{transfer.failed} failed".strip())
            return transfer
        raise _Lost(f"{what}: the archive ended without a final status")

    def _classify_early_failure(self, transfer: Transfer, started: float) -> Transfer:
        """Orthanc answers 0xC000 with no sub-operation counts both when the destination AE is not in
        its DicomModalities (or unreachable at the address registered there) and when the first
        C-STORE to us failed. Our SCP's association audit tells the two apart."""
        code = f"0x{transfer.status:04X}"
        calls = [a for a in (self.index.recent_associations(50) if self.index else []) if a["started_at"] >= started - 1]
        if not calls:
            # A destination the archive cannot reach yet (this node restarting, a network blip) looks
            # exactly like a wrong address in the PACS: transient, retried by time with the advice shown.
            raise ArchiveUnavailable(self._destination_message(f"{code} before any sub-operation, and it never connected to us")
                                     + " Retried: the node may just have been unreachable.")
        accepted = [a for a in calls if a["result"] != "rejected"]
        if not accepted:
            reasons = "; ".join(sorted({a["reason"] for a in calls}))
            fix = ("configure the PACS to use DICOM TLS when it sends to this node's TLS port (or register the plain port)"
                   if "TLS" in reasons else "add the archive's AE title to allowed_callers")
            raise RetrieveRefused(f"archive {self.name!r} tried to send to this node but the node rejected its association "
                                  f"({reasons}): {fix}")
        failures = "; ".join(sorted({a["reason"] for a in accepted if a["reason"]}))
        transfer.problems.append(
            f"C-MOVE failed with status {code} after the archive connected to us; C-STORE failures on our side: "
            f"{failures or 'none recorded'}"
        )
        return transfer

    def _destination_message(self, detail: str) -> str:
        s = self.settings
        address = s.priors.node_address or f"{s.host}:{s.port}"
        return (
            f"archive {self.name!r} ({self.peer.ae_title}@{self.peer.host}:{self.peer.port}) refused to send to move "
            f"destination {self.move_destination!r} ({detail}). Register the node in the PACS as a DICOM destination: "
            f"AE title {self.move_destination}, host and port {address} (Orthanc: DicomModalities), and check the PACS "
            f"can connect to that address."
        )


class DicomWebArchive(Archive):
    def __init__(self, config: ArchiveConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        from dicomweb_client.api import DICOMwebClient

        session = https_session(config.tls_ca, config.tls_cert, config.tls_key, check_hostname=config.tls_check_hostname)
        self.client = DICOMwebClient(
            config.dicomweb_url.rstrip("/"), session=session,
            timeout=(config.timeout_seconds, config.retrieve_timeout_seconds),
        )
        # dicomweb-client would otherwise retry every failed request itself, up to a minute, on top
        # of (and blind to) the pipeline's retries.
        self.client.set_http_retry_params(retry=False)

    def close(self) -> None:
        pass

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code >= 500 or code in (408, 429):
                raise _Lost(f"{what}: HTTP {code}") from exc
            raise ArchiveUnavailable(f"archive {self.name!r}: {what} answered HTTP {code}: {exc}") from exc

    def _search(self, what: str, operation: Callable[[], list[dict]], parse: Callable) -> Answers:
        answers = Answers()
        for item in self._call(what, operation):
            try:
                ds = Dataset.from_json(item)
            except Exception as exc:  # noqa: BLE001 - one bad answer must not hide the others
                answers.malformed.append(f"undecodable QIDO-RS answer: {exc}")
                continue
            try:
                answers.records.append(parse(ds))
            except MalformedResponse as exc:
                answers.malformed.append(str(exc))
        return answers

    def _find_studies(self, patient_id: str, issuer: str, date_range: str) -> Answers:
        filters = {"PatientID": patient_id, "StudyDate": date_range}
        if issuer:
            filters["IssuerOfPatientID"] = issuer
        return self._search(
            "QIDO-RS studies",
            lambda: self.client.search_for_studies(search_filters=filters, fields=list(STUDY_KEYS), get_remaining=True),
            lambda ds: parse_study(ds, self.name),
        )

    def _find_series(self, study_uid: str) -> Answers:
        return self._search(
            "QIDO-RS series",
            lambda: self.client.search_for_series(study_uid, fields=list(SERIES_KEYS), get_remaining=True),
            parse_series,
        )

    def _find_instances(self, study_uid: str, series_uid: str) -> Answers:
        return self._search(
            "QIDO-RS instances",
            lambda: self.client.search_for_instances(study_uid, series_uid, fields=list(INSTANCE_KEYS), get_remaining=True),
            parse_instance,
        )

    def _retrieve(self, study_uid: str, series_uid: str, sop_classes: set[str], ingestor: Ingestor) -> Transfer:
        transfer = Transfer(status=0)

        def run() -> Transfer:
            # Ask for the stored transfer syntax ("*"): no transcoding on the archive side.
            media = (("application/dicom", "*"),)
            for ds in self.client.iter_series(study_uid, series_uid, media_types=media):
                buffer = BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                result = ingestor.ingest(buffer.getvalue())
                if result.ok:
                    transfer.completed += 1
                else:
                    transfer.failed += 1
                    transfer.failed_uids.append(str(ds.get("SOPInstanceUID", "")))
                    transfer.problems.append(f"WADO-RS instance not stored: {result.message}")
            return transfer

        return self._call("WADO-RS series", run)
