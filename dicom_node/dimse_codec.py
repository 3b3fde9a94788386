"""The few DIMSE and file-meta encodings the front door does itself, with struct: byte for byte
what pynetdicom and pydicom produce (tests compare them), for the fixed shapes a C-STORE uses.
Each function returns None for anything out of the ordinary, which then goes to the library.
Pure functions: the patches that use them are in frontdoor.py."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pynetdicom
from pynetdicom.dimse_primitives import C_STORE

C_STORE_RSP_COMMAND = 0x8001
NO_DATA_SET = 0x0101
C_STORE_RQ_COMMAND = 0x0001
_STORE_REQUEST_REQUIRED = {0x0002, 0x0100, 0x0110, 0x0800, 0x1000}
_STORE_REQUEST_OPTIONAL = {0x0000, 0x0700, 0x1030, 0x1031}
_UID_CHARACTERS = frozenset(b"0123456789.")


def implicit_element(element: int, value: bytes) -> bytes:
    """One group-0000 element, implicit VR little endian."""
    return struct.pack("<HHL", 0, element, len(value)) + value


def uid_value(value) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def store_response_command(primitive) -> bytes | None:
    """A C-STORE-RSP's command set as pynetdicom encodes it, or None where it holds what this
    does not encode (an Offending Element, a comment that is not plain ASCII)."""
    comment = primitive.ErrorComment
    if primitive.OffendingElement is not None or (comment is not None and not str(comment).isascii()):
        return None
    parts = []
    if primitive.AffectedSOPClassUID is not None:
        parts.append(implicit_element(0x0002, uid_value(primitive.AffectedSOPClassUID)))
    parts.append(implicit_element(0x0100, struct.pack("<H", C_STORE_RSP_COMMAND)))
    parts.append(implicit_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)))
    parts.append(implicit_element(0x0800, struct.pack("<H", NO_DATA_SET)))
    parts.append(implicit_element(0x0900, struct.pack("<H", primitive.Status)))
    if comment is not None:
        text = str(comment).encode("ascii")
        parts.append(implicit_element(0x0902, text + b" " if len(text) % 2 else text))
    if primitive.AffectedSOPInstanceUID is not None:
        parts.append(implicit_element(0x1000, uid_value(primitive.AffectedSOPInstanceUID)))
    body = b"".join(parts)
    return implicit_element(0x0000, struct.pack("<L", len(body))) + body


def p_data_tf(context_id: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value (PS3.8 9.3.5)."""
    return struct.pack(">BBLLB", 0x04, 0, len(fragment) + 5, len(fragment) + 1, context_id) + fragment


@dataclass(frozen=True)
class SpoolMeta:
    """What ``create_file_meta`` is given for a spool file; written by ``spool_meta_header``."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = pynetdicom.PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION


def spool_meta_header(meta: SpoolMeta) -> bytes:
    """The spool file's group 0002, as pydicom's ``write_file_meta_info`` writes it."""
    version = meta.implementation_version.encode("ascii")
    body = b"".join((
        explicit_element(0x0001, b"OB", b"\x00\x01"),
        explicit_element(0x0002, b"UI", uid_value(meta.sop_class_uid)),
        explicit_element(0x0003, b"UI", uid_value(meta.sop_instance_uid)),
        explicit_element(0x0010, b"UI", uid_value(meta.transfer_syntax)),
        explicit_element(0x0012, b"UI", uid_value(meta.implementation_uid)),
        explicit_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    return explicit_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def explicit_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, explicit VR little endian (short-length VRs but OB)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def command_elements(command: bytes) -> dict[int, bytes] | None:
    """Group-0000 elements (implicit VR little endian) by element number; None if malformed."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        if group != 0 or element in elements or offset + length > end:
            return None
        elements[element] = command[offset:offset + length]
        offset += length
    return elements


def us_value(value: bytes) -> int | None:
    return struct.unpack("<H", value)[0] if len(value) == 2 else None


def plain_uid(value: bytes) -> str | None:
    """A UI value as pydicom decodes it (trailing NULs and spaces dropped), if only digits and dots."""
    value = value.rstrip(b"\0 ")
    return value.decode("ascii") if value and _UID_CHARACTERS.issuperset(value) else None


def store_request(command: bytes) -> C_STORE | None:
    """The C_STORE primitive pynetdicom makes of a C-STORE-RQ command set with a data set, or
    None for anything else (another command, an element it does not expect, odd values)."""
    elements = command_elements(command)
    if elements is None or not _STORE_REQUEST_REQUIRED <= elements.keys() <= _STORE_REQUEST_REQUIRED | _STORE_REQUEST_OPTIONAL:
        return None
    if us_value(elements[0x0100]) != C_STORE_RQ_COMMAND or us_value(elements[0x0800]) in (None, NO_DATA_SET):
        return None
    if 0x0000 in elements and len(elements[0x0000]) != 4:
        return None
    values: dict[str, object] = {
        "MessageID": us_value(elements[0x0110]),
        "AffectedSOPClassUID": plain_uid(elements[0x0002]),
        "AffectedSOPInstanceUID": plain_uid(elements[0x1000]),
    }
    if 0x0700 in elements:
        values["Priority"] = us_value(elements[0x0700])
    if 0x1031 in elements:
        values["MoveOriginatorMessageID"] = us_value(elements[0x1031])
    if 0x1030 in elements:
        title = elements[0x1030]
        values["MoveOriginatorApplicationEntityTitle"] = (
            title.decode("ascii").strip() if title.isascii() and b"\\" not in title and b"\0" not in title else None)
    if any(value is None for value in values.values()):
        return None
    request = C_STORE()
    try:
        for keyword, value in values.items():
            setattr(request, keyword, value)
    except (TypeError, ValueError):
        return None  # pynetdicom decodes it again and reports it
    return request


def _is_p_data_tf(pdu: bytes | bytearray | memoryview) -> bool:
    """A whole P-DATA-TF PDU (6-byte header, length as declared) with room for one item."""
    return len(pdu) >= 12 and pdu[0] == 0x04 and struct.unpack_from(">L", pdu, 2)[0] == len(pdu) - 6


@dataclass(frozen=True)
class DataFragments:
    """Where the data of each fragment lies in a P-DATA-TF PDU, and whether it ends the data set."""

    spans: tuple[tuple[int, int], ...]
    last: bool


def data_fragments(pdu: bytes | bytearray | memoryview, context_id: int) -> DataFragments | None:
    """The data-set fragments of a whole P-DATA-TF PDU (``pdu`` with its 6-byte header), when
    every item is a data-set fragment on ``context_id`` and only the last item may be the
    message's last fragment; None for anything else (a command fragment, another context, an
    item whose length does not add up, a last fragment followed by more), which pynetdicom then
    decodes as usual."""
    if not _is_p_data_tf(pdu):
        return None
    end = len(pdu)
    spans = []
    offset, last = 6, False
    while offset < end:
        if last or offset + 6 > end:
            return None
        length, item_context, control = struct.unpack_from(">LBB", pdu, offset)
        item_end = offset + 4 + length
        if length < 2 or item_end > end or item_context != context_id or control & 1:
            return None
        last = bool(control & 2)
        spans.append((offset + 6, item_end))
        offset = item_end
    return DataFragments(tuple(spans), last)


def whole_command(pdu: bytes | bytearray | memoryview) -> tuple[int, bytes] | None:
    """(presentation context ID, command set) of a whole P-DATA-TF PDU (with its 6-byte header)
    that is one item, the last (only) fragment of a command; None for anything else, which
    pynetdicom then decodes as usual."""
    if not _is_p_data_tf(pdu):
        return None
    end = len(pdu)
    length, context_id, control = struct.unpack_from(">LBB", pdu, 6)
    if length < 2 or 10 + length != end or control & 3 != 3:
        return None
    return context_id, bytes(pdu[12:end])
