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


# Derived UIDs are <root><digits of a hash of the inputs>, cut at 64 characters (pydicom's
# generate_uid): a root of at most 40 characters leaves 24 digits (~80 bits) of hash.
MAX_UID_ROOT_LENGTH = 40
_UID_ROOT_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+\.$")  # no leading zeros (PS3.5 9.1)


def check_uid_root(value: str) -> str:
    """The root for derived UIDs, ending with '.', or ValueError saying what is wrong."""
    root = str(value).strip()
    if root and not root.endswith("."):
        root += "."
    if not _UID_ROOT_PATTERN.match(root) or root[0] not in "012":
        raise ValueError(f"uid_root {value!r} is not a valid UID root: digits and dots, at least two components, "
                         "no component with a leading zero, starting with 0, 1 or 2 (e.g. your organisation's "
                         "registered root 1.2.840.xxxxx)")
    if root.startswith("2.25."):
        raise ValueError(f"uid_root {value!r}: 2.25 is for UUID-derived UIDs, which cannot carry a hash suffix; "
                         "use your organisation's registered root")
    if len(root) > MAX_UID_ROOT_LENGTH:
        raise ValueError(f"uid_root {value!r} is {len(root)} characters long; at most {MAX_UID_ROOT_LENGTH} "
                         "(with its final dot) leaves derived UIDs enough digits to stay unique")
    from pydicom.uid import generate_uid

    generate_uid(prefix=root, entropy_srcs=["uid_root check"])  # pydicom's own prefix rules agree (ValueError if not)
    return root
