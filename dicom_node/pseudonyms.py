"""Keyed pseudonyms for patient identifiers in logs and the PHI audit.

A medical record number has little entropy, so an unkeyed hash of it can be reversed by trying
every value. The pseudonym is HMAC-SHA256 under a site key instead, written with the key's id
in front (`k1:3f2a...`): after a key rotation old rows still say which key made them, and
`dicom-node pseudonym ID` computes the pseudonym under every key still listed, to find a
patient's rows from before and after the rotation.

The key file (setting `pseudonym_key_file`, e.g. a mounted Secret) holds one key per line,
`KEY_ID:SECRET`, the current key first; older keys below it are only used for look-ups. A file
of one bare secret (no `KEY_ID:`) is key `k1`. With no key file configured, a random key is
generated on first use into `<storage_dir>/.pseudonym-key` (id `local`), shared by every
process that shares the storage; a site running pods without shared storage must configure
the Secret instead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

GENERATED_KEY_FILE = ".pseudonym-key"
GENERATED_KEY_ID = "local"
DEFAULT_KEY_ID = "k1"
DIGEST_HEX = 16  # 64 bits: enough to correlate, nothing to reverse without the key
MIN_SECRET_LENGTH = 16
# KEY_ID ":" 16 hex digits fits the audit table's 32-character patient column.
MAX_KEY_ID = 12
_KEY_ID = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_KEY_ID}}}$")


class PseudonymKeyError(ValueError):
    """The key file is missing, unreadable or malformed (the message names the file and line)."""


@dataclass(frozen=True)
class Key:
    key_id: str
    secret: bytes


@dataclass(frozen=True)
class Pseudonymizer:
    keys: tuple[Key, ...]  # current key first
    source: str  # the file the keys came from, for messages

    @property
    def current(self) -> Key:
        return self.keys[0]

    def pseudonym(self, value: str | None, key: Key | None = None) -> str:
        if not value:
            return ""
        key = key or self.current
        digest = hmac.new(key.secret, value.strip().encode("utf-8"), hashlib.sha256).hexdigest()[:DIGEST_HEX]
        return f"{key.key_id}:{digest}"

    def all_pseudonyms(self, value: str) -> dict[str, str]:
        """The pseudonym of `value` under every key listed (key id -> pseudonym), to search old rows."""
        return {key.key_id: self.pseudonym(value, key) for key in self.keys}


def parse_keys(text: str, source: str) -> tuple[Key, ...]:
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if not lines:
        raise PseudonymKeyError(f"pseudonym key file {source} holds no key")
    if len(lines) == 1 and ":" not in lines[0][1]:
        lines = [(lines[0][0], f"{DEFAULT_KEY_ID}:{lines[0][1]}")]
    keys: list[Key] = []
    for number, line in lines:
        key_id, sep, secret = line.partition(":")
        if not sep or not _KEY_ID.match(key_id):
            raise PseudonymKeyError(f"pseudonym key file {source} line {number}: expected KEY_ID:SECRET, "
                                    f"KEY_ID of letters, digits, '-' or '_' (at most {MAX_KEY_ID})")
        if len(secret) < MIN_SECRET_LENGTH:
            raise PseudonymKeyError(f"pseudonym key file {source} line {number}: key {key_id!r} is shorter than "
                                    f"{MIN_SECRET_LENGTH} characters (use e.g. `openssl rand -base64 32`)")
        if any(k.key_id == key_id for k in keys):
            raise PseudonymKeyError(f"pseudonym key file {source} line {number}: key id {key_id!r} listed twice")
        keys.append(Key(key_id, secret.encode("utf-8")))
    return tuple(keys)


def load(key_file: Path | None, storage_dir: Path, create: bool = True) -> Pseudonymizer:
    """The configured keys, or this install's generated key (created on first use unless `create`
    is False: a look-up must not invent a key that matches nothing)."""
    if key_file is not None:
        try:
            text = Path(key_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise PseudonymKeyError(f"pseudonym_key_file {key_file}: {exc.strerror or exc}") from exc
        return Pseudonymizer(parse_keys(text, str(key_file)), str(key_file))
    path = Path(storage_dir) / GENERATED_KEY_FILE
    if not path.exists():
        if not create:
            raise PseudonymKeyError(f"no pseudonym key: {path} does not exist (the node generates it when it first "
                                    "starts); check storage_dir, or set pseudonym_key_file")
        _generate(path)
    return Pseudonymizer(parse_keys(path.read_text(encoding="utf-8"), str(path)), str(path))


def _generate(path: Path) -> None:
    """Write a random key once: written aside, then linked into place, so processes starting
    together all end up with the same key (the first link wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"# generated by dicom-node; configure pseudonym_key_file to use a site key\n"
                     f"{GENERATED_KEY_ID}:{secrets.token_urlsafe(32)}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)


_lock = threading.Lock()
_active: Pseudonymizer | None = None


def configure(key_file: Path | None, storage_dir: Path) -> Pseudonymizer:
    """Load the keys for this process (at start, so a bad key file stops it with a clear error)."""
    global _active
    with _lock:
        _active = load(key_file, storage_dir)
        return _active


def active() -> Pseudonymizer:
    """This process's keys; loaded from the settings on first use when nobody configured them."""
    global _active
    with _lock:
        if _active is None:
            from .config import load_settings

            settings = load_settings()
            _active = load(settings.pseudonym_key_file, settings.storage_dir)
        return _active
