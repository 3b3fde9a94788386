"""What happens to one received instance: validate, store durably, index. No networking here.

The C-STORE handler calls `Ingestor.ingest` with the encoded file (preamble, file meta and
the dataset exactly as received) and returns the status it gets back. Success is only
returned after the file is fsynced in place and the index row is committed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from . import dimse_status as st
from .index import Index, InstanceRecord
from .logs import log_event, phi_hash
from .storage import DiskFull, InstanceStore, StoreOutcome
from .uids import InvalidUID, MissingUID, check_uid

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# Objects with pixels that are not images to compare (segmentations, dose grids).
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "SEG", "REG", "RTDOSE", "RTSTRUCT", "RTPLAN"})
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class IngestResult:
    status: int
    message: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (st.SUCCESS, st.WARNING_DUPLICATE_CONFLICT)


class Ingestor:
    def __init__(self, store: InstanceStore, index: Index) -> None:
        self.store = store
        self.index = index

    def ingest(self, encoded: bytes, requested_sop_class: str = "", requested_sop_instance: str = "") -> IngestResult:
        try:
            return self._ingest(encoded, requested_sop_class, requested_sop_instance)
        except Exception as exc:  # never take the association down: answer with a failure status
            log.exception("ingest.unexpected_error")
            return IngestResult(st.PROCESSING_FAILURE, f"unexpected error while storing: {exc}")

    def _ingest(self, encoded: bytes, requested_sop_class: str, requested_sop_instance: str) -> IngestResult:
        if requested_sop_class == MEDIA_STORAGE_DIRECTORY:
            return _refuse(st.MEDIA_DIRECTORY_REFUSED, "DICOMDIR is a media directory, not an instance; send the files it lists")
        try:
            ds = _parse(encoded)
        except ValueError as exc:
            return _refuse(st.MALFORMED_DATASET, str(exc))
        try:
            study_uid = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID (0020,000D)")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID (0020,000E)")
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID (0008,0018)")
            sop_class = check_uid(ds.get("SOPClassUID"), "SOPClassUID (0008,0016)")
        except MissingUID as exc:
            return _refuse(st.MISSING_UID, str(exc))
        except InvalidUID as exc:
            return _refuse(st.INVALID_UID, str(exc))
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            return _refuse(st.MEDIA_DIRECTORY_REFUSED, "DICOMDIR is a media directory, not an instance")
        if requested_sop_instance and requested_sop_instance != sop_uid:
            return _refuse(
                st.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPInstanceUID {sop_uid} differs from the C-STORE AffectedSOPInstanceUID {requested_sop_instance}",
            )
        if requested_sop_class and requested_sop_class != sop_class:
            return _refuse(
                st.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPClassUID {sop_class} differs from the C-STORE AffectedSOPClassUID {requested_sop_class}",
            )

        try:
            stored = self.store.store(study_uid, series_uid, sop_uid, encoded)
        except DiskFull as exc:
            log_event(log, logging.ERROR, "ingest.disk_full", sop_instance_uid=sop_uid, detail=str(exc))
            return IngestResult(st.OUT_OF_RESOURCES, str(exc), sop_uid, study_uid)

        if stored.outcome is StoreOutcome.CONFLICT_REJECTED:
            return _refuse(st.DUPLICATE_SOP_INSTANCE, f"SOPInstanceUID {sop_uid} already stored with different content")

        record = _record(ds, study_uid, series_uid, sop_uid, sop_class, str(stored.path), len(encoded))
        if stored.outcome is StoreOutcome.DUPLICATE_IDENTICAL and self.index.instance_exists(sop_uid):
            return IngestResult(st.SUCCESS, "identical duplicate, already stored", sop_uid, study_uid)
        # A duplicate whose index row is missing (crash between fsync and commit) is indexed now.
        self.index.record_instance(record)

        fields = dict(
            sop_instance_uid=sop_uid,
            study_uid=study_uid,
            patient=phi_hash(record.patient_id),
            modality=record.modality,
            analysable=record.analysable,
        )
        if stored.outcome in (StoreOutcome.CONFLICT_KEPT_FIRST, StoreOutcome.CONFLICT_REPLACED):
            log_event(
                log,
                logging.WARNING,
                "ingest.duplicate_conflict",
                policy=self.store.duplicate_policy,
                conflict_copy=str(stored.conflict_copy),
                **fields,
            )
            return IngestResult(
                st.WARNING_DUPLICATE_CONFLICT,
                f"same SOPInstanceUID with different content ({stored.outcome.value})",
                sop_uid,
                study_uid,
            )
        log_event(log, logging.DEBUG, "ingest.stored", **fields)
        return IngestResult(st.SUCCESS, "", sop_uid, study_uid)


def _refuse(status: int, message: str) -> IngestResult:
    log_event(log, logging.WARNING, "ingest.refused", status=f"0x{status:04X}", reason=message)
    return IngestResult(status, message)


def _parse(encoded: bytes) -> Dataset:
    """Decode the dataset and make sure nothing was cut off before it is acknowledged."""
    try:
        ds = dcmread(BytesIO(encoded), force=False)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"malformed dataset: {type(exc).__name__}: {exc}") from exc
    # pydicom returns short values for a truncated stream instead of failing; compare each
    # element's declared length with what arrived (values stay unconverted: cheap).
    for element in ds.elements():
        if (
            isinstance(element, RawDataElement)
            and element.length != UNDEFINED_LENGTH
            and element.value is not None
            and len(element.value) != element.length
        ):
            raise ValueError(
                f"truncated dataset: element {element.tag} declares {element.length} bytes, {len(element.value)} arrived"
            )
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _record(
    ds: Dataset, study_uid: str, series_uid: str, sop_uid: str, sop_class: str, path: str, size: int
) -> InstanceRecord:
    modality = _text(ds, "Modality").upper()
    has_pixels = any(tag in ds for tag in PIXEL_TAGS)
    return InstanceRecord(
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        birth_date=_text(ds, "PatientBirthDate"),
        study_uid=study_uid,
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        series_uid=series_uid,
        modality=modality,
        body_part=_text(ds, "BodyPartExamined").upper(),
        series_number=_text(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        instance_number=_text(ds, "InstanceNumber"),
        view_position=_text(ds, "ViewPosition").upper(),
        laterality=(_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper(),
        analysable=has_pixels and modality not in NON_IMAGE_MODALITIES,
        path=path,
        size=size,
        urgent=_is_urgent(ds),
    )


URGENT_PRIORITIES = frozenset({"STAT", "HIGH"})


def _is_urgent(ds: Dataset) -> bool:
    """STAT/HIGH Requested Procedure Priority (0040,1003), at top level or in the Request Attributes Sequence."""
    values = [_text(ds, "RequestedProcedurePriority")]
    values += [_text(item, "RequestedProcedurePriority") for item in ds.get("RequestAttributesSequence", [])]
    return any(value.upper() in URGENT_PRIORITIES for value in values)
