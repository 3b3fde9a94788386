"""A fast scan of an instance in memory for the few elements the index needs.

pydicom's reader builds a raw element (and looks up its VR) for every element of the header;
that was a fifth of the SCP's CPU per small instance. The index reads about 25 of them. This
walks the top-level elements of a little-endian dataset by their headers, keeps the wanted
ones as pydicom's own raw elements (converted by pydicom where read), skips every other value
(sequences and fragments item by item), and checks that each value ends inside the data.

It gives up (returns None) on anything unusual: a truncated or malformed element, an item tag
at the top level, a VR that is not two capital letters (pydicom switches to implicit VR
there). The caller then parses with pydicom, which reports what is wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.dataelem import RawDataElement

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
MAX_DEPTH = 16  # nested sequences deeper than this: left to pydicom

_TAG_LENGTH = struct.Struct("<HHL")  # implicit VR: group, element, 4-byte length
_TAG_VR_SHORT = struct.Struct("<HH2sH")  # explicit VR: group, element, VR, 2-byte length
_LONG = struct.Struct("<L")


class _GiveUp(Exception):
    """Something pydicom should look at."""


@dataclass(frozen=True)
class Scanned:
    elements: dict[int, RawDataElement]  # the wanted top-level elements found
    tags: frozenset[int]  # every top-level tag


def scan(data: bytes, start: int, implicit: bool, wanted: frozenset[int], size: int | None = None) -> Scanned | None:
    """The wanted top-level elements of the little-endian dataset at `data[start:]`. `size`:
    the whole instance's, where `data` is only its first bytes; the walk then skips values past
    them (pixel data) by their lengths, and gives up where it would need to read there."""
    try:
        return _Walk(data, implicit, len(data) if size is None else size).top(start, wanted)
    except _GiveUp:
        return None


class _Walk:
    def __init__(self, data: bytes, implicit: bool, size: int) -> None:
        # size: where the instance ends (each value must end by then); available: what is read
        self.data, self.size, self.available, self.implicit = data, size, len(data), implicit

    def header(self, position: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR, length, where the value starts) of the element at `position`."""
        if position + 8 > self.available:
            raise _GiveUp
        group, element, vr, short = _TAG_VR_SHORT.unpack_from(self.data, position)
        tag = group << 16 | element
        if self.implicit or group == 0xFFFE:  # items and delimiters have no VR in any syntax
            return tag, None, _TAG_LENGTH.unpack_from(self.data, position)[2], position + 8
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _GiveUp
        if vr in LONG_LENGTH_VRS:
            if position + 12 > self.available:
                raise _GiveUp
            return tag, vr, _LONG.unpack_from(self.data, position + 8)[0], position + 12
        return tag, vr, short, position + 8

    def top(self, position: int, wanted: frozenset[int]) -> Scanned:
        elements: dict[int, RawDataElement] = {}
        tags = set()
        while position < self.size:
            tag, vr, length, value_at = self.header(position)
            if tag >> 16 == 0xFFFE or (vr == b"UN" and length == UNDEFINED_LENGTH):
                raise _GiveUp  # an item out of place; a UN sequence (its items are implicit VR)
            end = value_at + length  # skip_value's common case, without the call (one per element)
            if length == UNDEFINED_LENGTH:
                end = self.skip_value(length, value_at, 0)
            elif end > self.size:
                raise _GiveUp
            tags.add(tag)
            if tag in wanted:
                if end > self.available:
                    raise _GiveUp
                elements[tag] = RawDataElement(
                    tag, vr.decode() if vr is not None else None, length, self.data[value_at:end],
                    value_at, self.implicit, True, True, False)
            position = end
        return Scanned(elements, frozenset(tags))

    def skip_value(self, length: int, value_at: int, depth: int) -> int:
        """Where the value starting at `value_at` ends."""
        if length != UNDEFINED_LENGTH:
            end = value_at + length
            if end > self.size:
                raise _GiveUp
            return end
        if depth >= MAX_DEPTH:
            raise _GiveUp
        position = value_at
        while True:  # items (nested datasets or fragments) up to the sequence delimiter
            tag, _, item_length, item_at = self.header(position)
            if tag == SEQUENCE_DELIMITER:
                return item_at
            if tag != ITEM:
                raise _GiveUp
            position = self.skip_item(item_length, item_at, depth + 1)

    def skip_item(self, length: int, item_at: int, depth: int) -> int:
        if length != UNDEFINED_LENGTH:
            return self.skip_value(length, item_at, depth)
        position = item_at
        while True:  # a nested dataset up to its item delimiter
            tag, vr, element_length, value_at = self.header(position)
            if tag == ITEM_DELIMITER:
                return value_at
            if tag >> 16 == 0xFFFE or (vr == b"UN" and element_length == UNDEFINED_LENGTH):
                raise _GiveUp
            position = self.skip_value(element_length, value_at, depth)
