"""UID validation: a UID becomes a path component, so it must be checked before it touches the disk."""

from __future__ import annotations

import re

# PS3.5 9.1: digits and dots, no empty components, at most 64 characters.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


class InvalidUID(ValueError):
    pass


class MissingUID(InvalidUID):
    pass


def check_uid(value: object, attribute: str) -> str:
    """Return the UID as a str, or raise InvalidUID naming the attribute."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise MissingUID(f"{attribute} is missing")
    if len(text) > MAX_UID_LENGTH or not _UID_PATTERN.match(text):
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise InvalidUID(f"{attribute} {shown!r} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return text
