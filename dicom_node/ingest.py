"""What happens to one received instance: validate, store durably, index. No networking here.

The C-STORE handler calls `Ingestor.ingest_file` with the file the SCP streamed the instance
into (preamble, file meta and the dataset exactly as received), or `Ingestor.ingest` with the
same bytes in memory, and returns the status it gets back. Success is only returned after the
file is fsynced in place and the index row is committed.

The index is filled from a header-only parse. An instance of up to 1 MiB in the usual
little-endian file is scanned for the elements the index reads (header_scan.py); anything else
is parsed by pydicom, which stops before the pixel data, whose element and anything after it are
then walked by offset (item headers only, never the values), so a 1 GB instance is checked for
truncation without being read into memory.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble
from pydicom.datadict import keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)

from . import dimse_status as st
from . import header_scan
from .commit_group import CommitGroup
from .index import Index, InstanceRecord
from .logs import log_event, phi_hash
from .storage import DiskFull, InstanceStore, StoreOutcome
from .uids import InvalidUID, MissingUID, check_uid

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# Objects with pixels that are not images to compare (segmentations, dose grids).
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "SEG", "REG", "RTDOSE", "RTSTRUCT", "RTPLAN"})
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PIXEL_TAG_NUMBERS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_SIZE = 1 << 20  # header values above this are not read (their extent is still checked)
SMALL_INSTANCE = 1 << 20  # a file up to this size is read whole before it is parsed
# A bigger file's first bytes are scanned first (its pixel data skipped by its length): reading
# all of a 513 KB file into fresh memory cost more CPU than its scan (page faults, zeroing).
HEADER_PREFIX = 64 << 10
DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode()
META_PEEK = 4096  # the file meta (and its Transfer Syntax UID) is well within this
INFLATE_CHUNK = 1 << 20
MAX_INFLATED = 16 << 30  # bytes a deflated instance may inflate to
MAX_COMMENT = 64  # ErrorComment is LO: 64 characters at most
UID_ATTRIBUTES = (
    ("StudyInstanceUID", "StudyInstanceUID (0020,000D)"),
    ("SeriesInstanceUID", "SeriesInstanceUID (0020,000E)"),
    ("SOPInstanceUID", "SOPInstanceUID (0008,0018)"),
    ("SOPClassUID", "SOPClassUID (0008,0016)"),
)


@dataclass(frozen=True)
class IngestResult:
    status: int
    message: str = ""  # the detail, for the log and the association audit (UIDs included)
    sop_instance_uid: str = ""
    study_uid: str = ""
    comment: str = ""  # short reason for the C-STORE response, without UIDs; empty: from message

    @property
    def ok(self) -> bool:
        return self.status in (st.SUCCESS, st.WARNING_DUPLICATE_CONFLICT)

    @property
    def error_comment(self) -> str:
        """For the response's ErrorComment: at most 64 characters, never a UID cut in half."""
        return short_comment(self.comment or self.message)

    def response(self) -> Dataset | int:
        """What a C-STORE handler returns: the bare status (no Dataset to build), or with the
        ErrorComment when there is something to say."""
        if not (self.message or self.comment):
            return self.status
        response = Dataset()
        response.Status = self.status
        response.ErrorComment = self.error_comment  # LO: 64 characters, no UID cut in half
        return response


def short_comment(text: str, limit: int = MAX_COMMENT) -> str:
    """`text` if it fits, else whole words up to `limit` (a UID is one word: in whole, or out)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    words, kept = text.split(" "), ""
    for word in words:
        candidate = f"{kept} {word}" if kept else word
        if len(candidate) > limit - 4:
            break
        kept = candidate
    return f"{kept} ..." if kept else ""


class Malformed(ValueError):
    def __init__(self, detail: str, comment: str) -> None:
        super().__init__(detail)
        self.comment = comment


class Ingestor:
    def __init__(self, store: InstanceStore, index: Index, group_commit: bool = False) -> None:
        """`group_commit`: instances arriving on several associations at once share their folder
        fsyncs and index transaction (commit_group.py); the SCP's ingestor uses it."""
        self.store = store
        self.index = index
        self.commits = CommitGroup(index) if group_commit else None

    def ingest(self, encoded: bytes, requested_sop_class: str = "", requested_sop_instance: str = "") -> IngestResult:
        """An instance in memory (preamble, file meta, dataset)."""
        return self._guarded(encoded, requested_sop_class, requested_sop_instance)

    def ingest_file(self, path: Path, requested_sop_class: str = "", requested_sop_instance: str = "",
                    make_durable: Callable[[], None] | None = None, contents: bytes | None = None) -> IngestResult:
        """An instance in a file (the SCP's spool file in the store's .incoming): never read whole
        over SMALL_INSTANCE, and over HEADER_PREFIX only where a scan of its first bytes was not
        enough. `make_durable`: fsyncs that file as it is, on its writer's descriptor
        (frontdoor.ingest_received), once the instance passed its checks; without it store_file
        fsyncs a link to the file itself. `contents`: exactly the file's bytes, when the caller
        has them (read back by the front door), parsed instead of reading the file again (the
        index row comes from them, the file is what is stored)."""
        return self._guarded(path if isinstance(path, Path) else Path(path), requested_sop_class, requested_sop_instance,
                             make_durable, contents)

    def _guarded(self, source: bytes | Path, requested_sop_class: str, requested_sop_instance: str,
                 make_durable: Callable[[], None] | None = None, contents: bytes | None = None) -> IngestResult:
        try:
            return self._ingest(source, requested_sop_class, requested_sop_instance, make_durable, contents)
        except Exception as exc:  # never take the association down: answer with a failure status
            log.exception("ingest.unexpected_error")
            return IngestResult(
                st.PROCESSING_FAILURE, f"unexpected error while storing: {exc}",
                comment=f"unexpected error while storing ({type(exc).__name__})",
            )

    def _ingest(self, source: bytes | Path, requested_sop_class: str, requested_sop_instance: str,
                make_durable: Callable[[], None] | None = None, contents: bytes | None = None) -> IngestResult:
        if requested_sop_class == MEDIA_STORAGE_DIRECTORY:
            return _refuse(st.MEDIA_DIRECTORY_REFUSED, "DICOMDIR is a media directory, not an instance; send the files it lists",
                           "DICOMDIR is a media directory, not an instance")
        try:
            header, has_pixels, size = _parse_source(source if contents is None else contents)
        except Malformed as exc:
            return _refuse(st.MALFORMED_DATASET, str(exc), exc.comment)
        uids: dict[str, str] = {}
        for keyword, label in UID_ATTRIBUTES:
            try:
                uids[keyword] = check_uid(header.text(keyword), label)
            except MissingUID as exc:
                return _refuse(st.MISSING_UID, str(exc), f"{label} is missing")
            except InvalidUID as exc:
                return _refuse(st.INVALID_UID, str(exc), f"{label} is not a valid DICOM UID")
        study_uid, series_uid = uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
        sop_uid, sop_class = uids["SOPInstanceUID"], uids["SOPClassUID"]
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            return _refuse(st.MEDIA_DIRECTORY_REFUSED, "DICOMDIR is a media directory, not an instance",
                           "DICOMDIR is a media directory, not an instance")
        if requested_sop_instance and requested_sop_instance != sop_uid:
            return _refuse(
                st.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPInstanceUID {sop_uid} differs from the C-STORE AffectedSOPInstanceUID {requested_sop_instance}",
                "SOPInstanceUID differs from the request's AffectedSOPInstanceUID",
            )
        if requested_sop_class and requested_sop_class != sop_class:
            return _refuse(
                st.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPClassUID {sop_class} differs from the C-STORE AffectedSOPClassUID {requested_sop_class}",
                "SOPClassUID differs from the request's AffectedSOPClassUID",
            )

        try:
            if isinstance(source, Path):
                # With a commit group, the new entry's folder is fsynced by the group, below.
                stored = self.store.store_file(study_uid, series_uid, sop_uid, source, sync_dir=self.commits is None,
                                               make_durable=make_durable)
            else:
                stored = self.store.store(study_uid, series_uid, sop_uid, source)
        except DiskFull as exc:
            log_event(log, logging.ERROR, "ingest.disk_full", sop_instance_uid=sop_uid, detail=str(exc))
            return IngestResult(st.OUT_OF_RESOURCES, str(exc), sop_uid, study_uid, "free space below the node's threshold")

        if stored.outcome is StoreOutcome.CONFLICT_REJECTED:
            return _refuse(st.DUPLICATE_SOP_INSTANCE, f"SOPInstanceUID {sop_uid} already stored with different content",
                           "SOPInstanceUID already stored with different content")

        record = _record(header, study_uid, series_uid, sop_uid, sop_class, str(stored.path), size, has_pixels)
        if stored.outcome is StoreOutcome.DUPLICATE_IDENTICAL and self.index.instance_exists(sop_uid):
            return IngestResult(st.SUCCESS, "identical duplicate, already stored", sop_uid, study_uid)
        # A duplicate whose index row is missing (crash between fsync and commit) is indexed now.
        if self.commits is not None:
            pending_dir = stored.path.parent if stored.outcome is StoreOutcome.STORED and isinstance(source, Path) else None
            self.commits.commit(record, pending_dir)
        else:
            self.index.record_instance(record)

        def fields() -> dict:
            return dict(
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
                **fields(),
            )
            return IngestResult(
                st.WARNING_DUPLICATE_CONFLICT,
                f"same SOPInstanceUID with different content ({stored.outcome.value})",
                sop_uid,
                study_uid,
            )
        if log.isEnabledFor(logging.DEBUG):  # the keyed patient hash costs more than the rest
            log_event(log, logging.DEBUG, "ingest.stored", **fields())
        return IngestResult(st.SUCCESS, "", sop_uid, study_uid)


def _refuse(status: int, message: str, comment: str = "") -> IngestResult:
    log_event(log, logging.WARNING, "ingest.refused", status=f"0x{status:04X}", reason=message)
    return IngestResult(status, message, comment=comment)


# --- the header-only parse ---------------------------------------------------------------


def _parse_source(source: bytes | Path) -> tuple[Header, bool, int]:
    """(the header the index reads, whether it has pixel data, size in bytes); for an
    instance in memory, maybe only the elements the index reads (`_scanned`)."""
    if isinstance(source, Path):
        # os.open, fstat, read: half the system calls of Path.stat and read_bytes (each a GIL
        # hand-off under load); a file over SMALL_INSTANCE is parsed from the same descriptor.
        fd = os.open(source, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size > SMALL_INSTANCE:
                with os.fdopen(fd, "rb", closefd=False) as fp:
                    ds, has_pixels = _parse(fp, size)
                return Header.parsed(ds), has_pixels, size
            if size > HEADER_PREFIX:
                scanned = _scanned(_read_all(fd, HEADER_PREFIX), size)
                if scanned is not None:
                    return scanned[0], scanned[1], size
                os.lseek(fd, 0, os.SEEK_SET)
            source = _read_all(fd, size)  # parsed faster from memory, and bounded all the same
        finally:
            os.close(fd)
    scanned = _scanned(source)
    if scanned is not None:
        return scanned[0], scanned[1], len(source)
    ds, has_pixels = _parse(BytesIO(source), len(source))
    return Header.parsed(ds), has_pixels, len(source)


def _read_all(fd: int, size: int) -> bytes:
    """`size` bytes from `fd` (fewer if the file ends first)."""
    data = os.read(fd, size)
    while len(data) < size:  # a short read: not on a local file, but allowed
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


_PLAIN_UID = re.compile(r"[0-9.]+")


def _scanned(data: bytes, size: int | None = None) -> tuple[Header, bool] | None:
    """The usual file (`_plain_header`, little endian) scanned for the elements the index reads
    (header_scan.py): a Header of those alone, as raw elements; None where pydicom must parse.
    `size`: the file's, where `data` is only its first bytes (None too where the scan would
    need more of them)."""
    plain = _plain_header(data[:META_PEEK])
    if plain is None or not plain[3] or not _PLAIN_UID.fullmatch(plain[1]):
        return None  # big endian, or a syntax pydicom's UID would tidy (spaces, several values)
    start, syntax, implicit, _ = plain
    scanned = header_scan.scan(data, start, implicit, INDEXED_TAGS, size)
    if scanned is None:
        return None
    return Header.scanned(scanned.elements, syntax, implicit), bool(scanned.tags & PIXEL_TAG_NUMBERS)


def _parse(fp: BinaryIO, size: int) -> tuple[Dataset, bool]:
    """Decode the dataset up to its pixel data and make sure nothing was cut off anywhere."""
    try:
        if DEFLATED_UID in fp.read(META_PEEK):  # maybe deflated: pydicom would inflate it all in memory
            fp.seek(0)
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            if UID(str(meta.get("TransferSyntaxUID", ""))) == DeflatedExplicitVRLittleEndian:
                return _parse_deflated(fp, meta)
        fp.seek(0)
        plain = _plain_header(fp.read(META_PEEK))
        if plain is None:
            fp.seek(0)
            ds = dcmread(fp, force=False, stop_before_pixels=True, defer_size=DEFER_SIZE)
        else:  # the usual header, the spool files' own: read the dataset after it directly
            start, syntax, implicit, little = plain
            fp.seek(start)
            ds = read_dataset(fp, implicit, little, stop_when=_at_pixel_data, defer_size=DEFER_SIZE)
            # As dcmread: the encoding the header names (the reader may have switched to
            # implicit VR where a sender wrote it so in an explicit syntax).
            ds.set_original_encoding(implicit, little, ds.original_character_set)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
        stopped_at = fp.tell()
    except Malformed:
        raise
    except PARSE_ERRORS as exc:
        raise _malformed(exc) from exc
    _check_read_lengths(ds, size)
    has_pixels = any(tag in ds for tag in PIXEL_TAGS)
    if stopped_at >= size:
        # pydicom ends quietly on a partial element header at the end of the file: look there.
        stopped_at = _end_of_last_element(ds, size)
    if stopped_at < size:
        implicit, little = ds.original_encoding
        tail = _Tail(fp, size, bool(implicit), little is not False)
        tail.walk(stopped_at)
        has_pixels = has_pixels or bool(tail.tags & PIXEL_TAG_NUMBERS)
    return ds, has_pixels


def _plain_header(head: bytes) -> tuple[int, str, bool, bool] | None:
    """(where the dataset starts, its transfer syntax, implicit VR?, little endian?) for the
    usual file header: 128-byte preamble, "DICM", then group 0002 in explicit VR little endian
    opened by its group length, and a transfer syntax whose encoding pydicom's reader would take
    from the UID alone. pydicom builds (and validates) a Dataset of the whole group to tell the
    same (0.35 ms of 0.5 ms per header here); None for anything else: pydicom reads it."""
    if len(head) < 144 or head[128:132] != b"DICM":
        return None
    group, element, vr, length, group_length = struct.unpack_from("<HH2sHL", head, 132)
    if (group, element, vr, length) != (2, 0, b"UL", 4) or 144 + group_length + 4 > len(head):
        return None
    end, position, syntax = 144 + group_length, 144, None
    while position < end:
        group, element, vr = struct.unpack_from("<HH2s", head, position)
        if group != 2:
            return None
        if vr in LONG_LENGTH_VRS:
            length, start = struct.unpack_from("<L", head, position + 8)[0], position + 12
        else:
            length, start = struct.unpack_from("<H", head, position + 6)[0], position + 8
        if element == 0x0010:
            syntax = head[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        position = start + length
    if position != end or not syntax or struct.unpack_from("<H", head, end)[0] in (0x0000, 0x0002):
        return None  # a wrong group length, command elements, no syntax: pydicom's way
    if syntax == ImplicitVRLittleEndian:
        return end, syntax, True, True
    if syntax == ExplicitVRBigEndian:
        return end, syntax, False, False
    if syntax == DeflatedExplicitVRLittleEndian or syntax in PrivateTransferSyntaxes:
        return None
    return end, syntax, False, True  # explicit VR little endian, as pydicom reads every other syntax


PARSE_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError, struct.error, zlib.error)


def _malformed(exc: BaseException) -> Malformed:
    kind = type(exc).__name__ if type(exc).__name__ != "error" else f"{type(exc).__module__}.error"
    return Malformed(f"malformed dataset: {kind}: {exc}", f"malformed dataset ({kind})")


def _parse_deflated(fp: BinaryIO, meta) -> tuple[Dataset, bool]:
    """A deflated dataset, inflated chunk by chunk into a temporary file and parsed from there
    like any other (header only, the rest walked): never whole in memory, and a deflate bomb
    stops at MAX_INFLATED bytes. The stored file stays the deflated one, as received."""
    with tempfile.TemporaryFile() as body:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while chunk := fp.read(INFLATE_CHUNK):
                while chunk:
                    out = inflater.decompress(chunk, INFLATE_CHUNK)
                    total += len(out)
                    if total > MAX_INFLATED:
                        raise Malformed(f"deflated dataset inflates to more than {MAX_INFLATED >> 30} GiB",
                                        "deflated dataset too large when inflated")
                    body.write(out)
                    chunk = inflater.unconsumed_tail
            body.write(inflater.flush())
        except zlib.error as exc:
            raise _malformed(exc) from exc
        if not inflater.eof:
            raise Malformed("truncated dataset: the deflated stream ends before its last block",
                            "truncated dataset (deflate stream cut short)")
        size = body.tell()
        body.seek(0)
        try:
            ds = read_dataset(body, is_implicit_VR=False, is_little_endian=True, bytelength=None,
                              stop_when=_at_pixel_data, defer_size=DEFER_SIZE)
        except PARSE_ERRORS as exc:
            raise _malformed(exc) from exc
        ds.file_meta = meta
        _check_read_lengths(ds, size)
        has_pixels = any(tag in ds for tag in PIXEL_TAGS)
        stopped_at = body.tell()
        if stopped_at >= size:
            stopped_at = _end_of_last_element(ds, size)
        if stopped_at < size:
            tail = _Tail(body, size, implicit=False, little=True)
            tail.walk(stopped_at)
            has_pixels = has_pixels or bool(tail.tags & PIXEL_TAG_NUMBERS)
        return ds, has_pixels


def _end_of_last_element(ds: Dataset, size: int) -> int:
    last = None
    for last in ds.elements():
        pass
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and last.value_tell:
        return last.value_tell + last.length
    return size


def _truncated(tag, declared: int, arrived: int) -> Malformed:
    return Malformed(
        f"truncated dataset: element {Tag(tag)} declares {declared} bytes, {max(arrived, 0)} arrived",
        f"truncated dataset: element {Tag(tag)} cut short",
    )


def _check_read_lengths(ds: Dataset, size: int | None) -> None:
    # pydicom returns short values for a truncated stream instead of failing; compare each
    # element's declared length with what arrived (values stay unconverted: cheap). A value
    # too large to read (deferred) must at least end inside the file.
    for element in ds.elements():
        if not isinstance(element, RawDataElement) or element.length == UNDEFINED_LENGTH:
            continue
        if element.value is not None:
            if len(element.value) != element.length:
                raise _truncated(element.tag, element.length, len(element.value))
        elif size is not None and element.length and element.value_tell + element.length > size:
            raise _truncated(element.tag, element.length, size - element.value_tell)


ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


class _Tail:
    """Walk top-level elements from an offset to the end of the file by their headers alone:
    each value (pixel data, fragments, items) is skipped, and must end inside the file."""

    def __init__(self, fp: BinaryIO, size: int, implicit: bool, little: bool) -> None:
        self.fp, self.size, self.implicit = fp, size, implicit
        self.endian = "<" if little else ">"
        self.tags: set[int] = set()

    def walk(self, offset: int) -> None:
        self.fp.seek(offset)
        self._dataset(top=True)

    def _read(self, count: int, what: str, tag: int | None = None) -> bytes:
        data = self.fp.read(count)
        if len(data) != count:
            if tag is not None:
                raise Malformed(f"truncated dataset: {what} in element {Tag(tag)} cut short at byte {self.size}",
                                f"truncated dataset: element {Tag(tag)} cut short")
            raise Malformed(f"truncated dataset: {what} cut short at byte {self.size}", "truncated dataset")
        return data

    def _tag(self, tag_hint: int | None) -> int:
        group, element = struct.unpack(self.endian + "HH", self._read(4, "a tag", tag_hint))
        return group << 16 | element

    def _length(self, tag: int) -> tuple[int, bytes | None]:
        if self.implicit or tag >> 16 == 0xFFFE:
            return struct.unpack(self.endian + "L", self._read(4, "the length", tag))[0], None
        head = self._read(4, "the VR and length", tag)
        vr = head[:2]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            # Written implicit in an explicit syntax (as pydicom also tolerates): a 4-byte length.
            return struct.unpack(self.endian + "L", head)[0], None
        if vr in LONG_LENGTH_VRS:
            return struct.unpack(self.endian + "L", self._read(4, "the length", tag))[0], vr
        return struct.unpack(self.endian + "H", head[2:])[0], vr

    def _skip(self, length: int, tag: int) -> None:
        start = self.fp.tell()
        if start + length > self.size:
            raise _truncated(tag, length, self.size - start)
        self.fp.seek(start + length)

    def _dataset(self, top: bool, parent: int | None = None) -> None:
        while True:
            if top and self.fp.tell() >= self.size:
                return
            tag = self._tag(parent)
            length, _ = self._length(tag)
            if tag == ITEM_DELIMITER and not top:
                return
            if tag >> 16 == 0xFFFE:
                raise Malformed(f"malformed dataset: unexpected item tag {Tag(tag)}", "malformed dataset (item tag)")
            if top:
                self.tags.add(tag)
            if length == UNDEFINED_LENGTH:
                self._items(tag)
            else:
                self._skip(length, tag)

    def _items(self, parent: int) -> None:
        """An undefined-length value: items (fragments, or nested datasets) up to the delimiter."""
        while True:
            tag = self._tag(parent)
            length, _ = self._length(tag)
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM:
                raise Malformed(f"malformed dataset: {Tag(tag)} inside element {Tag(parent)}, expected an item",
                                f"malformed dataset: element {Tag(parent)}")
            if length == UNDEFINED_LENGTH:
                self._dataset(top=False, parent=parent)
            else:
                self._skip(length, parent)


class Header:
    """What the UID checks and the index row read of an instance's header: values as text, by
    keyword, and the transfer syntax. A single plain-ASCII value is what pydicom's conversion
    would give, so it is read off the raw element (about 10x cheaper per element; the index
    reads ~20 per instance); anything else (other characters, escape sequences, several values,
    sequences) goes through pydicom's Dataset, which a scanned header builds only then."""

    def __init__(self, get_raw: Callable[[int], object], transfer_syntax: str,
                 dataset: Callable[[], Dataset]) -> None:
        self._get_raw = get_raw
        self.transfer_syntax = transfer_syntax
        self._make_dataset = dataset
        self._dataset: Dataset | None = None

    @classmethod
    def parsed(cls, ds: Dataset, transfer_syntax: str | None = None) -> Header:
        """Of a Dataset pydicom read (its elements mostly raw still); the transfer syntax from
        its file meta unless given (a sequence item has none)."""
        if transfer_syntax is None:
            transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        return cls(ds.get_item, transfer_syntax, lambda: ds)

    @classmethod
    def scanned(cls, elements: dict[int, RawDataElement], syntax: str, implicit: bool) -> Header:
        """Of the raw elements header_scan.py found, in a little-endian dataset of `syntax`."""
        def dataset() -> Dataset:
            ds = Dataset(elements)
            ds.set_original_encoding(implicit, True, ds.original_character_set)
            value = syntax.encode("ascii")  # raw too: setting a UID validates it
            ds.file_meta = FileMetaDataset({TRANSFER_SYNTAX_TAG: RawDataElement(
                TRANSFER_SYNTAX_TAG, "UI", len(value), value, 0, False, True, True, False)})
            return ds
        return cls(elements.get, syntax, dataset)

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self._make_dataset()
        return self._dataset

    def text(self, keyword: str) -> str:
        raw = self._get_raw(keyword_dict[keyword])
        if raw is None:
            return ""
        if isinstance(raw, RawDataElement):
            value = raw.value
            if value is None:
                return ""
            if value.isascii() and not (b"\\" in value or b"\x1b" in value):
                return value.decode("ascii").strip(" \0")
        value = self.dataset.get(keyword, "")
        return "" if value is None else str(value).strip()

    def urgent(self) -> bool:
        """STAT/HIGH Requested Procedure Priority (0040,1003), at top level or in the Request
        Attributes Sequence."""
        values = [self.text("RequestedProcedurePriority")]
        if self._get_raw(REQUEST_ATTRIBUTES_TAG) is not None:
            values += [Header.parsed(item, transfer_syntax="").text("RequestedProcedurePriority")
                       for item in self.dataset.RequestAttributesSequence or []]
        return any(value.upper() in URGENT_PRIORITIES for value in values)


def _record(
    header: Header, study_uid: str, series_uid: str, sop_uid: str, sop_class: str, path: str, size: int,
    has_pixels: bool,
) -> InstanceRecord:
    text = header.text
    modality = text("Modality").upper()
    return InstanceRecord(
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        birth_date=text("PatientBirthDate"),
        study_uid=study_uid,
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        accession_number=text("AccessionNumber"),
        study_description=text("StudyDescription"),
        series_uid=series_uid,
        modality=modality,
        body_part=text("BodyPartExamined").upper(),
        series_number=text("SeriesNumber"),
        series_description=text("SeriesDescription"),
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=header.transfer_syntax,
        instance_number=text("InstanceNumber"),
        view_position=text("ViewPosition").upper(),
        laterality=(text("ImageLaterality") or text("Laterality")).upper(),
        analysable=has_pixels and modality not in NON_IMAGE_MODALITIES,
        path=path,
        size=size,
        urgent=header.urgent(),
    )


URGENT_PRIORITIES = frozenset({"STAT", "HIGH"})


# Every element the UID checks, _record and Header.urgent read, and the character set their text
# is decoded with: what _scanned keeps of a header (tests compare its records with pydicom's).
INDEXED_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyDescription", "Modality", "BodyPartExamined", "SeriesNumber", "SeriesDescription",
    "InstanceNumber", "ViewPosition", "ImageLaterality", "Laterality", "RequestedProcedurePriority",
    "RequestAttributesSequence",
)
INDEXED_TAGS = frozenset(keyword_dict[keyword] for keyword in INDEXED_KEYWORDS)
TRANSFER_SYNTAX_TAG = keyword_dict["TransferSyntaxUID"]
REQUEST_ATTRIBUTES_TAG = keyword_dict["RequestAttributesSequence"]
