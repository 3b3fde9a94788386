"""The front door: what every TCP connection to the SCP goes through before pynetdicom trusts it.

pynetdicom 3.0.4 reads a PDU with a blocking ``recv`` of whatever length its header declares,
on a socket without a timeout. A peer that sends half a PDU, or a header claiming 4 GB, holds
the connection (and an association slot) forever, and the bytes it does send pile up in memory.
It also keeps a received C-STORE data set in memory unless ``STORE_RECV_CHUNKED_DATASET`` is set,
which is global to the process (and changes what every C-STORE handler gets, ours and those of
our own C-GET requests). This module puts the checks in front of it, in one place:

- **Deadlines per protocol phase.** A complete A-ASSOCIATE-RQ within ``acse_timeout`` of the
  connection; the rest of each PDU within ``network_timeout`` of its first byte; every send
  within ``network_timeout``; a TLS handshake within ``acse_timeout``, in the connection's own
  thread (pynetdicom does it in the accept loop, where one silent client stops the listener).
  When a deadline passes the socket is closed.
- **PDU size caps, checked on the header.** A P-DATA-TF longer than ``max_pdu_size`` (the size
  we announced), any other PDU longer than ``MAX_CONTROL_PDU`` (an A-ASSOCIATE-RQ is a few KB),
  an unknown PDU type, or anything but an A-ASSOCIATE-RQ first: an A-ABORT, and the socket is
  closed without reading the body.
- **Concurrent connections per peer address** (``max_connections_per_host``), counted from
  accept to the end of the connection's association thread, associated or not; counted for the
  whole node, over all its SCP processes (connection_counts.py), as ``max_associations`` is.
- **Received data sets go to a file as they arrive** (``Event.dataset_path``), in the store's
  ``.incoming`` folder, for this node's associations only; a connection's leftover spool files
  (an association aborted mid-transfer) are removed when it ends.
- **Associations counted, not connections** (``max_associations``): a connection takes a slot
  when its A-ASSOCIATE-RQ is admitted (``FrontDoor.claim_association``) and frees it when it
  ends; pynetdicom's own limit, which counts every connection's thread, is not used.
- **Event-driven waits** instead of pynetdicom's polling loops (see below).

Each refusal is handed to ``on_refusal`` (the SCP logs and audits it) with the peer address
and the reason. The reader is installed per connection (``DULServiceProvider._read_pdu_data``),
the two ``dimse_messages`` patches (``install()``) only act on threads of connections accepted
here (or marked by ``spool_received_datasets``); the third makes the per-connection copy of the
presentation contexts a shallow one; the next two encode (and send) a C-STORE response and decode
a C-STORE request's command with struct (``_send_msg``, ``_receive_primitive``); the last two
spare a conformant UID set on a DIMSE primitive, PDU item or presentation context pydicom's two
checks (``_set_uid``, which remembers the UIDs it found conformant), and a known transfer syntax
added to a presentation context its five (``_add_transfer_syntax``); the reader takes such a
command from the received PDU itself (``_take_store_command``), writes the data-set fragments
of the request to its spool file (``_spool_data_fragments``) and serves the request in its own
thread while the association thread has nothing to do (``_serve_here``).
Every internal they touch is checked against ``PYNETDICOM_VERSION`` at start-up; pyproject
pins it. Upstream,
this would be: timeouts on ``AssociationSocket.recv``, a maximum-PDU check in
``_read_pdu_data``, a per-AE chunked-receive switch with a spool directory,
``max_connections_per_host`` on ``AssociationServer``, waits on queues and sockets instead of
sleeps in both reactors, no deepcopy of the contexts, DIMSE command sets of the common messages
encoded and decoded without a Dataset, a conformant UID checked once (and a known transfer
syntax not at all), small PDUs sent by the
thread that made them, command sets and data fragments taken from the PDU without PDV objects,
a request served by the thread that received it, and PDUs read through one buffer per
connection, as much at a time as has arrived.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import queue
import re
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable

import pydicom.config
import pydicom.filewriter
from pydicom.dataset import Dataset
from pydicom.uid import UID, UID_dictionary
import pynetdicom
import pynetdicom.dimse_messages
import pynetdicom.dimse_primitives
import pynetdicom.dsutils
import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
import pynetdicom.utils
import pynetdicom.transport
from pynetdicom import _config, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.timer import Timer
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from .connection_counts import LOCAL, ConnectionCounts, Counts, CountsUnavailable
from .connection_handoff import Handoff
from .ingest import HEADER_PREFIX, Ingestor, IngestResult
from . import dimse_codec, gil_held, incoming_owner
from .logs import log_event
from .spool_writer import SpoolWriter
from .storage import FILE_MODE

log = logging.getLogger(__name__)

PYNETDICOM_VERSION = "3.0.4"  # the internals below were read in this version; pyproject pins it

MAX_CONTROL_PDU = 1 << 20  # any PDU but P-DATA-TF: an A-ASSOCIATE-RQ with 128 contexts is ~30 KB
UNLIMITED_PDU_CAP = 1 << 26  # max_pdu_size 0 ("no limit" in DICOM) still stops a P-DATA at 64 MiB
REUSED_PDU_BUFFER = 1 << 20  # a PDU up to this size is read into its connection's one buffer
READ_AHEAD = 64 << 10  # room past the largest PDU so far, for the next ones' bytes already there
ABORT_SEND_TIMEOUT = 1.0

PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
# A-ABORT reason/diagnostic (PS3.8 9.3.8), source 0x02: service provider
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


class UnsupportedPynetdicom(RuntimeError):
    pass


def check_pynetdicom() -> None:
    """Refuse to start on a pynetdicom whose internals this module has not been checked against."""
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        raise UnsupportedPynetdicom(
            f"pynetdicom {pynetdicom.__version__} is installed; the SCP front door (dicom_node/frontdoor.py) "
            f"was written against {PYNETDICOM_VERSION}: re-check DULServiceProvider._read_pdu_data, "
            "DIMSEMessage.decode_msg and ThreadedAssociationServer, then update PYNETDICOM_VERSION"
        )


@dataclass(frozen=True)
class Limits:
    acse_timeout: float
    network_timeout: float
    max_pdu_size: int  # 0: no limit announced (capped at UNLIMITED_PDU_CAP here)
    max_connections_per_host: int  # 0: no limit
    spool_dir: Path | None = None  # where received data sets are written; None: kept in memory
    max_associations: int = 0  # associated connections at once (not those still connecting); 0: no limit


@dataclass(frozen=True)
class Refusal:
    """A connection the front door refused or cut: the SCP logs and audits it."""

    result: str  # "rejected" (never let in) or "aborted" (cut)
    reason: str
    host: str
    port: int
    calling_ae: str = ""
    called_ae: str = ""
    assoc: object | None = None  # the pynetdicom Association, when there was one


# --- the module patches: chunked receive per connection, cheap context copies --------------


def _connection() -> _Connection | None:
    """The front-door connection whose DUL thread is running, if any."""
    return getattr(threading.current_thread(), "_front_door", None)


class _ChunkedPerConnection:
    """Stands in for ``pynetdicom._config`` inside ``pynetdicom.dimse_messages``: C-STORE data
    sets are written to a file on connections accepted here, as configured elsewhere."""

    def __getattr__(self, name: str):
        return getattr(_config, name)

    @property
    def STORE_RECV_CHUNKED_DATASET(self) -> bool:  # noqa: N802 (pynetdicom's name)
        conn = _connection()
        if conn is not None and conn.limits.spool_dir is not None:
            return True
        return _config.STORE_RECV_CHUNKED_DATASET


def _spool_file(*args, **kwargs):
    """``NamedTemporaryFile`` for ``dimse_messages``: in the store's .incoming on our connections."""
    conn = _connection()
    if conn is None or conn.limits.spool_dir is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    handle = _SpoolHandle.create(conn.limits.spool_dir)
    # Kept until closed: pynetdicom closes and removes each after its C-STORE handler; those of
    # a transfer cut half-way are removed when the connection ends.
    conn.spool_files = [h for h in conn.spool_files if not h.closed]
    conn.spool_files.append(handle)
    return handle


class _SpoolHandle:
    """The part of a ``NamedTemporaryFile(delete=False)`` pynetdicom uses (``write``,
    ``file.flush``, ``name``, ``close``), without tempfile's random-name and wrapper machinery,
    which was a sixth of the DUL thread's time per instance. Private to its owner (0600)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.name = str(path)
        self.file = SpoolWriter(fd)

    @classmethod
    def create(cls, directory: Path) -> _SpoolHandle:
        while True:
            path = incoming_owner.new_path(directory, ".rx.dcm")
            try:
                # O_RDWR: read back on the same descriptor (_read_back)
                return cls(path, gil_held.open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # practically never: this process's token and its own count
                # (InstanceStore's .part names have no such retry: they fail instead)
                continue

    def write(self, data) -> int:
        return self.file.write(data)

    def make_durable(self) -> None:
        """fsync the complete file on its own descriptor, its mode set as the store's files
        (InstanceStore.store_file calls it before linking the file into place)."""
        self.file.sync(FILE_MODE)

    def close(self) -> None:
        self.file.close()

    @property
    def closed(self) -> bool:
        return self.file.closed


def ingest_received(ingestor: Ingestor, event) -> IngestResult:
    """The instance a C-STORE event brought, ingested. Streamed to a spool file (the front door,
    or ``spool_received_datasets``): from that file, made durable and, up to HEADER_PREFIX,
    read back on the spool's own descriptor. Otherwise from the data set pynetdicom holds."""
    request = event.request
    requested = str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or "")
    spooled = getattr(request, "_dataset_path", None)
    if not isinstance(spooled, Path):
        return ingestor.ingest(event.encoded_dataset(include_meta=True), *requested)
    handle = getattr(request, "_dataset_file", None)
    if not isinstance(handle, _SpoolHandle):
        return ingestor.ingest_file(spooled, *requested)
    try:
        return ingestor.ingest_file(spooled, *requested, make_durable=handle.make_durable,
                                    contents=_read_back(handle, HEADER_PREFIX))
    finally:
        _remove_spool_file(request, handle)


def _remove_spool_file(request, handle: _SpoolHandle) -> None:
    """Close and remove the spool file (linked into the store by now, or not wanted), as
    pynetdicom would after the handler, but through gil_held; pynetdicom then finds no file."""
    handle.close()
    try:
        gil_held.unlink(handle.name, handle.file.size)  # its last link, if it was not stored
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("frontdoor.spool_remove_failed", exc_info=True)  # the connection's end tries again
        return
    request._dataset_file = None


def _read_back(handle: _SpoolHandle, limit: int) -> bytes | None:
    """A spool file's bytes, read on the descriptor they were written with, when there are at
    most `limit` of them; None: the ingest reads it from its path."""
    if handle.file.closed or handle.file.size > limit:
        return None
    try:
        return handle.file.read_all()
    except (OSError, ValueError):  # cut short, or closed meanwhile: read from its path instead
        log.warning("frontdoor.spool_read_back_failed", exc_info=True)
        return None


class SpoolOnly:
    """Stands in for a front-door connection on an association this node requested (our C-GET):
    the C-STORE data sets received on it go to files in `spool_dir`, nothing else changes."""

    def __init__(self, spool_dir: Path) -> None:
        self.limits = Limits(0.0, 0.0, 0, 0, spool_dir=Path(spool_dir))
        self.spool_files: list = []

    def remove_leftovers(self) -> None:
        """Spool files of a transfer cut half-way (pynetdicom removes the others itself)."""
        _remove_spool_files(self.spool_files)
        self.spool_files = []


def spool_received_datasets(assoc, spool_dir: Path) -> SpoolOnly:
    """Stream what `assoc` (requested, established) receives by C-STORE to `spool_dir`;
    handlers then get ``event.dataset_path``. Call before the request that brings them."""
    install()
    spool = SpoolOnly(spool_dir)
    assoc.dul._front_door = spool  # read by _connection() in the association's DUL thread
    return spool


def _remove_spool_files(handles: list) -> None:
    for handle in handles:
        try:
            handle.close()
            Path(handle.name).unlink(missing_ok=True)
        except OSError:
            pass


_install_lock = threading.Lock()


def _copy_contexts(value, memo=None):
    """``deepcopy`` for ``pynetdicom.transport``, where its one use copies the server's supported
    presentation contexts for each new connection: ~190 contexts of 16 transfer syntaxes took
    about 100 ms of CPU (holding the GIL) per connection. A context's only mutable member is its
    list of transfer syntaxes (UIDs are immutable strings), so a shallow copy with its own list
    is the same copy (made as ``copy.copy`` makes it, without its reduce protocol: a quarter of
    the time); anything else still goes to ``copy.deepcopy``."""
    if isinstance(value, list) and all(type(cx) is PresentationContext for cx in value):
        copies = []
        for cx in value:
            new = object.__new__(PresentationContext)
            new.__dict__.update(cx.__dict__)
            new._transfer_syntax = list(cx._transfer_syntax)
            copies.append(new)
        return copies
    return copy.deepcopy(value, memo)


def install() -> None:
    """Apply the module patches (idempotent): chunked receive per connection in
    ``pynetdicom.dimse_messages`` with the spool file's meta header written directly, the
    direct C-STORE response in ``pynetdicom.dimse``, the cheap context copy in
    ``pynetdicom.transport``, the UID setter's shortcut in ``pynetdicom.dimse_primitives``,
    ``pdu_items``, ``pdu_primitives`` and ``presentation``, and the shortcut of
    ``PresentationContext.add_transfer_syntax``; checks the version first."""
    check_pynetdicom()
    module = pynetdicom.dimse_messages
    with _install_lock:
        if isinstance(module._config, _ChunkedPerConnection):
            return
        if (module._config is not _config or module.NamedTemporaryFile is not tempfile.NamedTemporaryFile
                or module.create_file_meta is not pynetdicom.dsutils.create_file_meta
                or module.write_file_meta_info is not pydicom.filewriter.write_file_meta_info):
            raise UnsupportedPynetdicom("pynetdicom.dimse_messages was patched by someone else")
        if pynetdicom.transport.deepcopy is not copy.deepcopy:
            raise UnsupportedPynetdicom("pynetdicom.transport was patched by someone else")
        for uid_module in _UID_SETTING_MODULES:
            if uid_module.set_uid is not _PYNETDICOM_SET_UID:
                raise UnsupportedPynetdicom(f"{uid_module.__name__} was patched by someone else")
        if (DIMSEServiceProvider.send_msg is not _PYNETDICOM_SEND_MSG
                or DIMSEServiceProvider.receive_primitive is not _PYNETDICOM_RECEIVE_PRIMITIVE):
            raise UnsupportedPynetdicom("pynetdicom.dimse was patched by someone else")
        if PresentationContext.add_transfer_syntax is not _PYNETDICOM_ADD_TRANSFER_SYNTAX:
            raise UnsupportedPynetdicom("pynetdicom.presentation was patched by someone else")
        module.NamedTemporaryFile = _spool_file
        module.create_file_meta = _spool_meta
        module.write_file_meta_info = _write_spool_meta
        module._config = _ChunkedPerConnection()
        pynetdicom.transport.deepcopy = _copy_contexts
        DIMSEServiceProvider.send_msg = _send_msg
        DIMSEServiceProvider.receive_primitive = _receive_primitive
        for uid_module in _UID_SETTING_MODULES:
            uid_module.set_uid = _set_uid
        PresentationContext.add_transfer_syntax = _add_transfer_syntax


# --- the UID setter of DIMSE primitives, PDU items and presentation contexts ---------------
#
# Each UID set on a DIMSE primitive goes through pynetdicom's set_uid, which checks it twice
# with pydicom (the configured UI validator, then UID.is_valid): about 10 us each, four per
# C-STORE (the request's two UIDs, then the response's). So does each UID of an association
# request, several times over as its PDU items become primitives and presentation contexts:
# storescu proposes over a hundred contexts, and that was about 14 ms of an association's 25 ms
# of CPU. A UID that is conformant (PS3.5 9.1: numbers without leading zeros, dots between, at
# most 64 characters; ASCII bytes decoded first, as set_uid decodes them) passes both checks
# unchanged and unlogged, so it is returned as set_uid would return it; anything else (None,
# empty, a non-conformant or invalid UID, bytes not ASCII, a validator configured otherwise)
# still goes to set_uid, which warns or raises as it would.

_PYNETDICOM_SET_UID = pynetdicom.utils.set_uid
_PYNETDICOM_UI_VALIDATOR = _config.VALIDATORS["UI"]
_CONFORMANT_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UID_SETTING_MODULES = (pynetdicom.dimse_primitives, pynetdicom.pdu_items, pynetdicom.pdu_primitives,
                        pynetdicom.presentation)


def _set_uid(value, name: str, allow_empty: bool = True, allow_none: bool = True, validate: bool = True):
    """``pynetdicom.utils.set_uid``, without its two checks for a conformant UID."""
    if _config.VALIDATORS["UI"] is not _PYNETDICOM_UI_VALIDATOR:
        return _PYNETDICOM_SET_UID(value, name, allow_empty, allow_none, validate)
    if type(value) in (str, UID, bytes):
        seen = _CONFORMANT_SEEN.get(value)
        if seen is not None:
            return seen
    text = value.decode("ascii") if type(value) is bytes and value.isascii() else value
    if type(text) in (str, UID) and len(text) <= 64 and _CONFORMANT_UID.fullmatch(text):
        uid = text if type(text) is UID else UID(text, pydicom.config.IGNORE)  # checked above
        if len(_CONFORMANT_SEEN) >= CONFORMANT_SEEN_LIMIT:
            _CONFORMANT_SEEN.clear()  # bounded: the instance UIDs of C-STOREs pass through too
        _CONFORMANT_SEEN[value] = uid
        return uid
    return _PYNETDICOM_SET_UID(value, name, allow_empty, allow_none, validate)


# An association request names the same few hundred UIDs (abstract and transfer syntaxes) as
# the one before it, each several times: a UID found conformant is remembered, by the value it
# came as (str, UID or bytes), and given back without the match.
CONFORMANT_SEEN_LIMIT = 4096
_CONFORMANT_SEEN: dict[str | bytes, UID] = {}

# PresentationContext.add_transfer_syntax checks each UID it is given five ways (pydicom's UID,
# pynetdicom's validate_uid, is_valid twice, is_transfer_syntax), each a regular expression or a
# dictionary lookup, for each of the several hundred transfer syntaxes an association request
# proposes: about an eighth of an association's CPU. A transfer syntax pydicom knows passes
# every one of them, without a warning, so it is added as they would add it; anything else
# (None, a private or unknown UID, a non-conformant one) still goes to pynetdicom.

_PYNETDICOM_ADD_TRANSFER_SYNTAX = PresentationContext.add_transfer_syntax


def _known_transfer_syntaxes() -> dict[str | bytes, UID]:
    """Each transfer syntax in pydicom's dictionary that is conformant, by str and by bytes."""
    known: dict[str | bytes, UID] = {}
    for uid in map(UID, UID_dictionary):
        if uid.is_transfer_syntax and not uid.is_private and _CONFORMANT_UID.fullmatch(uid):
            known[str(uid)] = known[uid.encode()] = uid
    return known


_KNOWN_TRANSFER_SYNTAXES = _known_transfer_syntaxes()


def _add_transfer_syntax(self, syntax) -> None:
    """``PresentationContext.add_transfer_syntax``, without its checks for a known transfer syntax."""
    known = _KNOWN_TRANSFER_SYNTAXES.get(syntax) if type(syntax) in (str, UID, bytes) else None
    if known is None:
        return _PYNETDICOM_ADD_TRANSFER_SYNTAX(self, syntax)
    if known not in self._transfer_syntax:
        self._transfer_syntax.append(known)


# --- the two per-instance encodings, done directly ------------------------------------------
#
# Per C-STORE, pynetdicom builds its response as a pydicom Dataset (each value validated as it
# is set), encodes it twice (once for the group length) and cuts it into P-DATA fragments; and
# it writes the spool file's meta header through another Dataset. Together that was about 45 %
# of the CPU an instance cost the front door (py-spy, 1 association, ingest stubbed out). Both
# are a few fixed elements: written with struct (dimse_codec.py), byte for byte what pynetdicom
# writes, and anything out of the ordinary still goes to pynetdicom.

_PYNETDICOM_SEND_MSG = DIMSEServiceProvider.send_msg


def _listened(assoc, *events) -> bool:
    """Whether a handler is bound to any of ``events``: those want pynetdicom's own objects
    (or its events fired), so the shortcuts here step aside."""
    return any(assoc.get_handlers(event) for event in events)


def _send_msg(self, primitive, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``: a C-STORE response that fits one fragment is encoded
    here (when nobody listens for EVT_DIMSE_SENT, which wants pynetdicom's message object), and
    sent at once where ``_DirectSend`` allows, else through the DUL thread."""
    if type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None and primitive.Status is not None:
        command = dimse_codec.store_response_command(primitive)
        limit = self.maximum_pdu_size
        if command is not None and (not limit or len(command) <= limit - 6) and not _listened(self.assoc, evt.EVT_DIMSE_SENT):
            fragment = b"\x03" + command  # the last (only) command fragment
            direct = getattr(self.dul, "_direct_send", None)
            if direct is not None and direct.send(self.dul, context_id, fragment):
                return
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, fragment))
            self.dul.send_pdu(pdata)
            return
    _PYNETDICOM_SEND_MSG(self, primitive, context_id)


# Where pynetdicom's DUL thread would only fire events for these, nobody may listen to them.
_DIRECT_SEND_SKIPS = (evt.EVT_PDU_SENT, evt.EVT_DATA_SENT, evt.EVT_FSM_TRANSITION)


class _DirectSend:
    """Sending a P-DATA-TF from the association thread, without a round through the DUL thread
    (its queue, a wake-up, the state machine's DT-1 and pynetdicom's PDU objects): on a plain
    socket in Sta6 (data transfer), when nothing queued earlier is still unsent. The DUL thread
    runs every state machine action holding ``lock``, so a PDU it is sending is never overtaken
    or interleaved; TLS sockets are left to the DUL thread (an SSL object is not for two
    threads at once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def send(self, dul, context_id: int, fragment: bytes) -> bool:
        """Send it now; False where the DUL thread has to (then nothing was sent)."""
        with self.lock:
            sock = dul.socket
            if (sock is None or type(sock.socket) is not socket.socket or dul.to_provider_queue.qsize()
                    or dul.state_machine.current_state != "Sta6"
                    or _listened(dul.assoc, *_DIRECT_SEND_SKIPS)):
                return False
            pdu = dimse_codec.p_data_tf(context_id, fragment)
            sent = gil_held.send_now(sock.socket, pdu)
            if sent < len(pdu):
                sock.send(pdu[sent:])  # waits for room; a failure puts Evt17 on the DUL's queue
            return True


def _spool_meta(**kwargs) -> dimse_codec.SpoolMeta:
    return dimse_codec.SpoolMeta(**kwargs)


def _write_spool_meta(fp, meta, enforce_standard: bool = True) -> None:
    """``write_file_meta_info`` for the spool file's header, as pydicom writes it."""
    if not isinstance(meta, dimse_codec.SpoolMeta):
        return _PYDICOM_WRITE_FILE_META(fp, meta, enforce_standard)
    fp.write(dimse_codec.spool_meta_header(meta))


_PYDICOM_WRITE_FILE_META = pydicom.filewriter.write_file_meta_info


# --- the C-STORE request's command, decoded directly ---------------------------------------
#
# pynetdicom decodes each command set into a pydicom Dataset, then walks its elements into the
# primitive: about 150 us of the DUL thread per instance. A C-STORE-RQ command is a handful of
# fixed elements; decoded with struct (dimse_codec.py) into the same primitive, through the
# primitive's own setters (which validate), about 30 us. Anything unusual goes to pynetdicom.

_PYNETDICOM_RECEIVE_PRIMITIVE = DIMSEServiceProvider.receive_primitive


class _DecodedStoreRequest(pynetdicom.dimse_messages.C_STORE_RQ):
    """A C-STORE-RQ message whose command ``dimse_codec.store_request`` decoded: its data set
    fragments go through pynetdicom's ``decode_msg`` into the spool file as usual, and it hands
    over the primitive made from the command."""

    def __init__(self, request: C_STORE, context_id: int, transfer_syntax: str) -> None:
        # DIMSEMessage.__init__'s members, without its per-keyword command Dataset (which looks
        # the class up by name): what decode_msg reads and writes of a message with a data set.
        self.context_id = context_id
        self.encoded_command_set = BytesIO()
        self.data_set = BytesIO()
        self.command_set = Dataset()
        self._request = request
        handle = _spool_file()
        handle.write(b"\x00" * 128 + b"DICM")
        _write_spool_meta(handle, dimse_codec.SpoolMeta(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax=transfer_syntax,
        ))
        self._data_set_file = handle
        self._data_set_path = handle.path

    def message_to_primitive(self) -> C_STORE:
        request = self._request
        request.DataSet = self.data_set
        request._context_id = self.context_id
        request._dataset_path = self._data_set_path
        request._dataset_file = self._data_set_file
        return request


def _receive_primitive(self, primitive) -> None:
    """``DIMSEServiceProvider.receive_primitive``: a P-DATA that is one whole C-STORE-RQ command
    is taken by ``_start_store_request``; anything else by pynetdicom."""
    pdvs = primitive.presentation_data_value_list
    if self.message is None and type(primitive) is P_DATA and len(pdvs) == 1 and pdvs[0][1][:1] == b"\x03":
        context_id, data = pdvs[0]
        if _start_store_request(self, context_id, bytes(data[1:])):
            return
    _PYNETDICOM_RECEIVE_PRIMITIVE(self, primitive)


def _start_store_request(dimse, context_id: int, command: bytes) -> bool:
    """A whole command set received while no message is under way: when it is a C-STORE-RQ on
    an accepted context of a connection of ours that spools, decoded by
    ``dimse_codec.store_request`` into the message its data set will be written to (when
    nobody listens for EVT_DIMSE_RECV, which wants pynetdicom's message object); False (nothing
    done) for pynetdicom to decode."""
    conn = _connection()
    context = dimse.assoc._accepted_cx.get(context_id)
    if (conn is None or conn.limits.spool_dir is None or context is None
            or _listened(dimse.assoc, evt.EVT_DIMSE_RECV)):
        return False
    request = dimse_codec.store_request(command)
    if request is None:
        return False
    dimse.message = _DecodedStoreRequest(request, context_id, context.transfer_syntax[0])
    return True


# --- a C-STORE's command and data set, taken straight from the received PDU ------------------
#
# Each P-DATA-TF otherwise takes a round through pynetdicom: a copy of the PDU, its PDV objects,
# two queues, the state machine's DT-2 and a P-DATA primitive, before receive_primitive sees the
# command or decode_msg writes the data to the file. In data transfer with nothing queued before
# it, a PDU that is one whole C-STORE-RQ command is decoded where it lies, and the fragments of
# the data set of a request so decoded are written from where they lie.

# Where pynetdicom would only fire events for these, nobody may listen to them.
_RECEIVE_FAST_PATH_SKIPS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION, evt.EVT_DIMSE_RECV)


def _bypasses_pynetdicom(dul) -> bool:
    """Whether a received P-DATA-TF may skip the DUL's decoding, queues and state machine: in
    data transfer, with nothing queued before it, and nobody listening for their events."""
    return not (dul.event_queue.qsize() or dul._recv_pdu.qsize() or dul.state_machine.current_state != "Sta6"
                or _listened(dul.assoc, *_RECEIVE_FAST_PATH_SKIPS))


def _take_store_command(dul, pdu: memoryview) -> bool:
    """A P-DATA-TF that is one whole C-STORE-RQ command, taken as DT-2 and ``receive_primitive``
    would (``_start_store_request``) without pynetdicom's PDU objects, queues and state machine;
    False (nothing done) where pynetdicom has to decode it."""
    if dul.assoc.dimse.message is not None or not _bypasses_pynetdicom(dul):
        return False
    command = dimse_codec.whole_command(pdu)
    return command is not None and _start_store_request(dul.assoc.dimse, *command)


def _spool_data_fragments(dul, pdu: memoryview) -> bool:
    """Write a P-DATA-TF that only carries data-set fragments of the current decoded C-STORE-RQ
    to its spool file and, with the last one, serve the request or hand it to the association
    thread, as ``receive_primitive`` would; False (nothing done) where pynetdicom has to decode it."""
    dimse = dul.assoc.dimse
    message = dimse.message
    if type(message) is not _DecodedStoreRequest or not _bypasses_pynetdicom(dul):
        return False
    fragments = dimse_codec.data_fragments(pdu, message.context_id)
    if fragments is None:
        return False
    view = memoryview(pdu)
    spool = message._data_set_file.file
    for start, end in fragments.spans:
        spool.write(view[start:end])
    spool.flush()  # as decode_msg: nothing of it held in memory
    if fragments.last:
        dimse.message = None
        item = (message.context_id, message.message_to_primitive())
        if not _serve_here(dul.assoc, item):
            dimse.msg_queue.put(item)
    return True


def _serve_here(assoc, item: tuple[int, C_STORE]) -> bool:
    """Serve a C-STORE whose data set the reader just completed in the DUL thread itself, as
    the association thread would, when that thread runs its reactor, serves nothing and has
    nothing queued (``serving`` is free): one thread hand-off (queue, wake-up, GIL) less per
    instance. The peer waits for this answer before it sends more, so nothing goes unread
    meanwhile; the answer goes out directly or through the DUL's queue, which this thread
    drains next. False: queue it for the association thread as usual."""
    serving = assoc._front_door_serving
    if not serving.acquire(blocking=False):
        return False
    try:
        if (assoc.dimse.msg_queue.qsize() or not assoc.is_established or assoc._kill
                or not assoc._reactor_checkpoint.is_set()):  # paused by a local send or release
            return False
        context_id, primitive = item
        # Not idle while it is served (the association thread, free now, watches the timer).
        idle = _pause_idle_timer(assoc.dul)
        try:
            assoc._serve_request(primitive, context_id)
        finally:
            _resume_idle_timer(assoc.dul, idle, restart=True)
        return True
    finally:
        serving.release()


# --- one connection ------------------------------------------------------------------------


_NEVER_EXPIRES = Timer(None)


def _pause_idle_timer(dul) -> Timer:
    """Take the network idle timer out (the association thread sees one that never expires)
    while this DUL thread is busy with the peer; returns it for ``_resume_idle_timer``."""
    idle, dul._idle_timer = dul._idle_timer, _NEVER_EXPIRES
    return idle


def _resume_idle_timer(dul, idle: Timer, restart: bool) -> None:
    dul._idle_timer = idle
    if restart:
        idle.restart()


class _Closed(Exception):
    """The connection was closed or cut while reading; what to report is already decided."""


class _Connection:
    """Deadlines, caps and bookkeeping of one accepted connection; ``read_pdu`` runs in its DUL thread."""

    def __init__(self, door: FrontDoor, assoc, host: str, port: int) -> None:
        self.door = door
        self.limits = door.limits
        self.assoc = assoc
        self.host, self.port = host, port
        self.acse_deadline = time.monotonic() + self.limits.acse_timeout
        self.spool_files: list = []
        self.holds_association = False  # counted against max_associations until it ends
        self.saw_data = False
        self.peer_closed = False
        self.reported = False
        # What was received and not yet taken: inbox[head:tail]. A read takes whatever has
        # arrived, up to the room left, so one recv usually brings a C-STORE's command and data.
        # It grows with the largest PDU (up to REUSED_PDU_BUFFER), READ_AHEAD beyond it.
        self._inbox = bytearray()
        self._head = self._tail = 0

    # The replacement for DULServiceProvider._read_pdu_data (same contract: put the FSM event on
    # dul.event_queue and the decoded PDU on dul._recv_pdu).
    def read_pdu(self, only_if_arrived: bool = False) -> bool:
        """Read one PDU, or cut the connection trying; `only_if_arrived`: return False at once,
        nothing read, when no byte of one has arrived (the DUL loop's "anything on the socket?",
        without a select of its own on a plain socket). True: the DUL has an event to act on."""
        dul = self.assoc.dul
        sock = dul.socket.socket if dul.socket else None
        if sock is None:
            dul.event_queue.put("Evt17")
            return True
        before_association = _awaiting_request(dul)
        deadline = time.monotonic() + self.limits.network_timeout
        if before_association:
            deadline = min(deadline, self.acse_deadline)
        # Not idle while a PDU arrives: its own deadline applies (pynetdicom's network idle timer
        # would abort the association first, from the other thread, without saying why).
        idle = _pause_idle_timer(dul)
        arrived = True
        try:
            if not self._fill(sock, 6, deadline, before_association, "a PDU header", only_if_arrived):
                arrived = False
                return False
            pdu_type, _, length = struct.unpack_from(">BBL", self._inbox, self._head)
            name = PDU_NAMES.get(pdu_type)
            if name is None:
                self._cut(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
            if before_association and pdu_type not in (0x01, 0x07):
                self._cut(f"{name} before any A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU)
            cap = self._cap(pdu_type)
            if length > cap:
                self._cut(f"{name} declares {length} bytes, more than the {cap} accepted", ABORT_INVALID_PARAMETER)
            pdu = self._take(sock, 6 + length, deadline, before_association, f"the {name} of {6 + length} bytes")
        except _Closed:
            return True
        finally:
            _resume_idle_timer(dul, idle, restart=arrived)
            if arrived:
                now_open = dul.socket.socket if dul.socket is not None else None
                if now_open is not None and not _is_plain(now_open):
                    _settimeout(now_open, self.limits.network_timeout)  # bounds every send too
        if pdu_type == 0x04 and (_spool_data_fragments(dul, pdu) or _take_store_command(dul, pdu)):
            return True
        try:
            decoded, event = dul._decode_pdu(bytearray(pdu))  # a copy: what it decodes may keep parts
        except Exception as exc:
            try:
                self._cut(f"undecodable {name}: {type(exc).__name__}: {exc}"[:300], ABORT_INVALID_PARAMETER)
            except _Closed:
                return True
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)
        return True

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as a PDU (the socket may be empty meanwhile)."""
        return self._tail - self._head

    def _fill(self, sock, count: int, deadline: float, before_association: bool, what: str,
              only_if_arrived: bool = False) -> bool:
        """At least `count` bytes in the inbox (the connection's one buffer, reused for every
        PDU up to REUSED_PDU_BUFFER: a new, zeroed one per PDU was a big instance's most page
        faults); False (only_if_arrived) when not one byte has arrived."""
        if self.buffered >= count:
            return True
        if not self.buffered:
            self._head = self._tail = 0
        if self._head + count > len(self._inbox):  # move what is left to the front, in more room if need be
            if len(self._inbox) < count:  # first use, or a bigger PDU than before
                inbox = bytearray(count + READ_AHEAD)
                inbox[:self.buffered] = self._inbox[self._head:self._tail]
                self._inbox = inbox
            else:
                self._inbox[:self.buffered] = self._inbox[self._head:self._tail]
            self._head, self._tail = 0, self.buffered
        nothing_yet = only_if_arrived and not self.buffered
        if nothing_yet and not (_is_plain(sock) or self.assoc.dul.socket.ready):
            return False
        got = self._recv(sock, memoryview(self._inbox)[self._tail:], count - self.buffered, deadline,
                         before_association, what, count, self.buffered, only_if_arrived=nothing_yet)
        self._tail += got
        return got > 0

    def _take(self, sock, size: int, deadline: float, before_association: bool, what: str) -> memoryview:
        """The next `size`-byte PDU (header included), whole, where it lies: in the inbox for a
        body up to REUSED_PDU_BUFFER, else in a buffer of its own. Valid until the next read;
        nothing the fast paths make of a PDU keeps a reference to it (the spool writer copies
        what it holds)."""
        if size <= 6 + REUSED_PDU_BUFFER:
            self._fill(sock, size, deadline, before_association, what)
            self._head += size
            return memoryview(self._inbox)[self._head - size:self._head]
        pdu = bytearray(size)
        have = min(self.buffered, size)
        pdu[:have] = self._inbox[self._head:self._head + have]
        self._head += have
        self._recv(sock, memoryview(pdu)[have:], size - have, deadline, before_association, what, size, have)
        return memoryview(pdu)

    def _cap(self, pdu_type: int) -> int:
        if pdu_type == 0x04:
            return self.limits.max_pdu_size or UNLIMITED_PDU_CAP
        return MAX_CONTROL_PDU

    def _recv(self, sock, into: memoryview, minimum: int, deadline: float, before_association: bool,
              what: str, total: int, before: int, only_if_arrived: bool = False) -> int:
        """At least `minimum` bytes into `into` by `deadline` (as many as have come, up to its
        length), or the connection is cut; how many (0: only_if_arrived, and not one had come).
        `total`, `before`: the size of what is read and how much of it had come before, for the
        reason given. A plain socket is read without waiting (MSG_DONTWAIT), and waited for in
        poll() only when empty: one system call for data already there, where a socket timeout
        costs a poll and two ioctls around every recv."""
        plain = _is_plain(sock)
        got = 0
        while got < minimum:
            try:
                if plain:
                    try:
                        n = gil_held.recv_into(sock, into[got:])
                    except BlockingIOError:
                        if only_if_arrived and got == 0:
                            return 0
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or not _wait_readable(sock, remaining):
                            raise TimeoutError from None
                        continue
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                    n = sock.recv_into(into[got:])
            except TimeoutError:
                if before_association and deadline >= self.acse_deadline:
                    reason = f"no complete A-ASSOCIATE-RQ within acse_timeout ({self.limits.acse_timeout:g} s)"
                else:
                    reason = f"{what} incomplete {self.limits.network_timeout:g} s (network_timeout) after it began"
                self._cut(f"{reason}: {before + got} of {total} bytes", None)
            except (OSError, ValueError) as exc:
                self._close(f"connection error: {exc}", quiet=True)
            if n == 0:
                self.peer_closed = True
                quiet = not self.saw_data and before + got == 0
                self._close(f"peer closed the connection after {before + got} of {total} bytes of {what}", quiet=quiet)
            got += n
            self.saw_data = True
        return got

    def _cut(self, reason: str, abort_reason: int | None) -> None:
        """Report, send an A-ABORT (unless the peer is just slow), close; raises _Closed."""
        self.report("aborted", reason)
        sock = self.assoc.dul.socket.socket if self.assoc.dul.socket else None
        if sock is not None:
            pdu = A_ABORT_RQ()
            pdu.source = 0x02
            pdu.reason_diagnostic = abort_reason if abort_reason is not None else 0x00
            try:
                sock.settimeout(ABORT_SEND_TIMEOUT)
                sock.sendall(pdu.encode())
            except (OSError, ValueError):
                pass
        self._close(reason, quiet=True)

    def _close(self, reason: str, quiet: bool) -> None:
        if not quiet:
            log_event(log, logging.INFO, "connection.closed", peer=f"{self.host}:{self.port}", reason=reason)
        dul = self.assoc.dul
        self._inbox, self._head, self._tail = bytearray(), 0, 0  # what is left is never read now
        if dul.socket is not None:
            dul.socket.close()  # queues Evt17: the state machine ends the association
        if _awaiting_request(dul):
            # The association thread waits up to acse_timeout for an A-ASSOCIATE-RQ that will
            # not come; wake it (marked aborted, it neither negotiates nor runs) so the
            # connection frees its slot now.
            self.assoc.is_aborted = True
            dul.to_user_queue.put(A_ASSOCIATE())
        raise _Closed

    def report(self, result: str, reason: str) -> None:
        if self.reported:
            return
        self.reported = True
        primitive = getattr(self.assoc.requestor, "primitive", None)
        calling = getattr(primitive, "calling_ae_title", None) or ""
        called = getattr(primitive, "called_ae_title", None) or ""
        self.door.report(Refusal(result, reason, self.host, self.port, calling.strip(), called.strip(), self.assoc))

    def end(self) -> None:
        """After the association thread: stop the DUL, close the socket, remove spool leftovers."""
        assoc, dul = self.assoc, self.assoc.dul
        give_up = time.monotonic() + 5
        while dul.is_alive() and not dul.stop_dul():
            if time.monotonic() > give_up:
                dul.kill_dul()
                break
            time.sleep(0.01)
        if dul.socket is not None and dul.socket.socket is not None:
            dul.socket.close()
        _remove_spool_files(self.spool_files)
        if self.holds_association:
            self.holds_association = False
            self.door.release_association()
        if not (self.reported or self.saw_data or self.peer_closed) and assoc.requestor.primitive is None:
            self.report("aborted", f"no A-ASSOCIATE-RQ within acse_timeout ({self.limits.acse_timeout:g} s)")


def _awaiting_request(dul) -> bool:
    # Sta2: connection open, no A-ASSOCIATE-RQ yet. Sta1 too: the DUL reads the socket before it
    # handles the queued Evt5 (transport connection indication) that moves it to Sta2.
    return dul.state_machine.current_state in ("Sta1", "Sta2")


def _settimeout(sock, seconds: float) -> None:
    try:
        sock.settimeout(seconds)
    except OSError:
        pass


def _is_plain(sock) -> bool:
    """A plain TCP socket (not TLS: an SSL socket takes no recv flags and buffers on its own)."""
    return type(sock) is socket.socket


def _prepare_socket(sock, network_timeout: float) -> None:
    """A connection's socket before its association starts. A TLS one gets `network_timeout` as
    its timeout (every send and receive bounded). A plain one is left blocking with the kernel's
    send timeout (SO_SNDTIMEO) at `network_timeout`: sends stay bounded, and reads go without a
    socket timeout (``_Connection._recv`` keeps the deadlines)."""
    if not _is_plain(sock):
        _settimeout(sock, network_timeout)
        return
    seconds = max(network_timeout, 0.001) if network_timeout else 0.0
    try:
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000)))
    except OSError:
        pass


def _wait_readable(sock, seconds: float) -> bool:
    """Whether `sock` has data (or an error, or end of file) within `seconds`."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(seconds * 1000))


# --- event-driven waits ------------------------------------------------------------------
#
# pynetdicom's two threads per association poll: the DUL thread loops over "anything to send?
# anything on the socket? any event?" and sleeps between rounds; the association thread sleeps
# 1 ms between looks at its message queue. On two cores that polling took about a third of the
# node's CPU under load (py-spy), and each hop adds up to one sleep of latency. Here, on the
# connections accepted through the front door, both threads sleep until there is work: the DUL
# thread in poll() on its socket and a wake-up pipe (written when something is queued for it),
# the association thread on an Event (set when a message or primitive is queued for it). The
# loops below are pynetdicom 3.0.4's run_reactor/_run_reactor with the sleep replaced; a
# timeout still bounds each wait so timers and kill flags are seen as before.

DUL_WAIT = 0.05  # seconds: the longest a DUL thread sleeps without a wake-up (ARTIM timer, kill)
ASSOCIATION_WAIT = 0.1  # the association thread's (network idle timer, kill from elsewhere)


class _WakingQueue(queue.Queue):
    """A ``queue.Queue`` that calls ``wake`` after each put (under the queue's own lock)."""

    def __init__(self, wake: Callable[[], None], items=()) -> None:
        super().__init__()
        self._wake = wake
        for item in items:
            self.queue.append(item)

    def _put(self, item) -> None:
        super()._put(item)
        self._wake()


class _Wakeup:
    """What the two threads of one association sleep on."""

    def __init__(self, dul_thread: threading.Thread) -> None:
        self.dul_thread = dul_thread  # needs no wake-up for its own puts
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.association = threading.Event()
        self._lock = threading.Lock()  # never write to a closed (and maybe reused) descriptor
        self._closed = False

    def dul(self) -> None:
        if threading.current_thread() is self.dul_thread:
            return  # it looks at its queues again before it sleeps
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write_fd, b"\0")
            except BlockingIOError:
                pass  # full pipe: a wake-up is pending anyway

    def assoc(self) -> None:
        self.association.set()

    def drain(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def wait_dul(self, sock, timeout: float) -> None:
        """Until data on `sock`, a wake-up or `timeout`; a wake-up is drained here (the pipe
        stays readable until then, so none is lost, and an empty one costs no read)."""
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        if sock is not None:
            try:
                poller.register(sock.fileno(), select.POLLIN)
            except (OSError, ValueError):
                return  # closed meanwhile: the loop notices
        if any(fd == self._read_fd for fd, _ in poller.poll(timeout * 1000)):
            self.drain()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read_fd)
                os.close(self._write_fd)


def _make_event_driven(assoc, wake: _Wakeup) -> None:
    """Swap the four queues for waking ones and both reactor loops for the waiting ones."""
    dul, dimse = assoc.dul, assoc.dimse
    dul.event_queue = _WakingQueue(wake.dul, dul.event_queue.queue)  # Evt5 is already queued
    dul.to_provider_queue = _WakingQueue(wake.dul, dul.to_provider_queue.queue)
    dul.to_user_queue = _WakingQueue(wake.assoc, dul.to_user_queue.queue)
    dimse.msg_queue = _WakingQueue(wake.assoc, dimse.msg_queue.queue)
    stop_dul, kill_dul = dul.stop_dul, dul.kill_dul

    def stop() -> bool:
        if threading.current_thread() is dul:
            # Association.kill() waits for this to say the DUL stopped; in the DUL thread itself
            # (pynetdicom aborts from _serve_request when a request cannot be served, and the
            # reader may serve one, _serve_here) that wait would never end. The association is
            # marked killed by then: wake its thread, let this one send the A-ABORT queued
            # before, and the connection's end stops it (_Connection.end).
            wake.assoc()
            return True
        if dul.state_machine.current_state == "Sta1":
            dul._kill_thread = True
            wake.dul()
        return stop_dul()

    def kill() -> None:
        kill_dul()
        wake.dul()

    dul.stop_dul, dul.kill_dul = stop, kill
    # The DUL Thread took its target (the bound run_reactor) in __init__, so replacing
    # run_reactor would change nothing: replace what the thread runs.
    dul._direct_send = _DirectSend()
    # Held by whichever thread serves a request; by nobody until the association thread's
    # reactor starts, after the handlers of EVT_ACCEPTED and EVT_ESTABLISHED have run.
    assoc._front_door_serving = threading.Lock()
    assoc._front_door_serving.acquire()
    dul.run = functools.partial(_run_dul, dul, wake)
    assoc._run_reactor = functools.partial(_run_association, assoc, wake)


def _transport_event(dul, conn: _Connection) -> bool:
    """``DULServiceProvider._is_transport_event``: a PDU read if one has begun to arrive. In
    data transfer the read itself finds out, without pynetdicom's select() before it."""
    if dul.state_machine.current_state == "Sta13" or not dul.socket or dul.socket._is_connected is False:
        return dul._is_transport_event()
    return conn.read_pdu(only_if_arrived=True)


def _dul_idle(dul) -> bool:
    """Nothing for the DUL thread to do until a wake-up or data on the socket."""
    if dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize():
        return False
    if dul.state_machine.current_state == "Sta13":
        return False  # it closes the socket on its next round
    if dul._front_door.buffered:
        return False  # the start of the next PDU came with the last one
    sock = dul.socket.socket if dul.socket is not None else None
    return not (isinstance(sock, ssl.SSLSocket) and sock.pending())


def _run_dul(dul, wake: _Wakeup) -> None:
    """``DULServiceProvider.run_reactor`` (pynetdicom 3.0.4), sleeping until there is work."""
    assoc = dul.assoc
    direct = dul._direct_send
    conn = dul._front_door
    dul._idle_timer.start()
    try:
        while True:
            if not assoc._dul_ready.is_set():
                assoc._dul_ready.set()
            if dul._kill_thread:
                break
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if dul._process_recv_primitive():
                    pass
                elif _transport_event(dul, conn):
                    dul._idle_timer.restart()
            except Exception as exc:
                # As pynetdicom: bypass the state machine, send an A-ABORT and stop both threads.
                log.error("frontdoor.dul_error", exc_info=exc)
                abort = A_ABORT_RQ()
                abort.source, abort.reason_diagnostic = 0x02, 0x00
                try:
                    if dul.socket is not None:
                        dul.socket.send(abort.encode())
                except Exception:
                    pass
                assoc.is_aborted = True
                assoc.is_established = False
                assoc._kill = True
                dul._kill_thread = True
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                if _dul_idle(dul):
                    wake.wait_dul(dul.socket.socket if dul.socket is not None else None, DUL_WAIT)
                continue
            with direct.lock:  # a direct send never overtakes a PDU this action sends
                dul.state_machine.do_action(event)
    finally:
        wake.assoc()  # the association thread checks dul.is_alive()


def _run_association(assoc, wake: _Wakeup) -> None:
    """``Association._run_reactor`` (pynetdicom 3.0.4, acceptor), sleeping until there is work."""
    assoc._is_paused = False
    assoc._front_door_serving.release()  # established: requests may be served (_serve_here)
    while not assoc._kill:
        # Clear, then look: a message queued after the look sets the Event again.
        wake.association.clear()
        if not (assoc.dimse.msg_queue.qsize() or assoc.dul.to_user_queue.qsize() or not assoc.dul.is_alive()):
            wake.association.wait(ASSOCIATION_WAIT)
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False

        if assoc.dimse.msg_queue.qsize():
            with assoc._front_door_serving:
                context_id, msg = assoc.dimse.get_msg(block=False)
                if msg:
                    assoc._serve_request(msg, context_id)

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return

        if assoc.acse.is_aborted():
            assoc.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return

        if not assoc.dul.is_alive():
            assoc.kill()
            return

        if assoc.dul.idle_timer_expired():
            log.error("frontdoor.network_timeout")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return


# --- the server ----------------------------------------------------------------------------


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the front door attached before the association starts; it
    returns when the association thread ends (so the connection is counted until then)."""

    def handle(self) -> None:
        door: FrontDoor = self.server.front_door  # type: ignore[attr-defined]
        assoc = self._create_association()
        host, port = self.client_address[0], self.client_address[1]
        conn = _Connection(door, assoc, host, port)
        assoc.dul._front_door = conn
        assoc.dul._read_pdu_data = conn.read_pdu
        wake = _Wakeup(assoc.dul)
        _make_event_driven(assoc, wake)
        _prepare_socket(self.request, door.limits.network_timeout)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        try:
            assoc.start()
            assoc.join()
        finally:
            conn.end()
            wake.close()


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server: per-host limit and TLS handshake in the connection's thread.
    In the first (or only) SCP process it accepts; each connection is served here or passed to
    the extra SCP process holding the fewest (connection_handoff.py)."""

    daemon_threads = True
    block_on_close = False  # a connection thread lives as long as its association
    front_door: FrontDoor

    @property
    def listener(self) -> str:
        """Which of the node's listeners this is, the same name in every SCP process."""
        return "tls" if self.ssl_context is not None else "plain"

    def get_request(self):
        # No TLS handshake here: pynetdicom does it in the accept loop, without a timeout.
        assert self.socket is not None
        return self.socket.accept()

    def process_request_thread(self, request, client_address) -> None:
        door = self.front_door
        host, port = client_address[0], client_address[1]
        owner = door.admit(host)
        if owner is None:
            door.report(Refusal(
                "rejected", f"more than max_connections_per_host ({door.limits.max_connections_per_host}) "
                f"connections from {host}", host, port))
            self.shutdown_request(request)
            return
        if owner != LOCAL and door.pass_on(owner, host, request, self.listener, client_address):
            request.close()  # not shutdown: the extra process serves the same connection
            return
        self.serve_admitted(request, client_address)

    def serve_admitted(self, request, client_address) -> None:
        """Serve a connection admitted for this process, until its association ends."""
        door = self.front_door
        host, port = client_address[0], client_address[1]
        try:
            if self.ssl_context is not None:
                request = self._handshake(request, host, port)
                if request is None:
                    return
            self.finish_request(request, client_address)
        except Exception:
            log.exception("frontdoor.connection_failed")
            self.shutdown_request(request)
        finally:
            door.release(host)

    def _handshake(self, raw: socket.socket, host: str, port: int):
        door = self.front_door
        try:
            raw.settimeout(door.limits.acse_timeout)
            tls = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
            return tls
        except (OSError, ValueError) as exc:
            reason = "TLS handshake not completed within acse_timeout" if isinstance(exc, TimeoutError) else (
                f"TLS handshake failed: {exc}")
            door.report(Refusal("rejected", reason[:300], host, port))
            self.shutdown_request(raw)
            return None


class PassedConnectionServer(GuardedAssociationServer):
    """An extra SCP process's listener: it binds nothing and accepts nothing; the first process
    passes it connections it has admitted (`serve_passed`)."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def serve_passed(self, connection: socket.socket, client_address: tuple[str, int]) -> None:
        threading.Thread(target=self.serve_admitted, args=(connection, client_address), daemon=True).start()

    def shutdown(self) -> None:
        # No serve_forever loop to stop (BaseServer.shutdown would wait for one).
        self.server_close()
        self.ae._servers.remove(self)


class FrontDoor:
    """One per SCP process: its limits, the node's counts (shared by its listeners, and by its
    other SCP processes), the refusal sink."""

    def __init__(self, limits: Limits, on_refusal: Callable[[Refusal], None], counts: Counts | None = None,
                 handoff: Handoff | None = None) -> None:
        """`counts`: the node's connection and association counts, when they are kept elsewhere
        (an extra SCP process asks the first one: connection_counts.py); by default, here.
        `handoff`: the first process's links to the extra SCP processes, which it passes
        connections to (connection_handoff.py); None: it serves every connection itself."""
        check_pynetdicom()
        install()
        self.limits = limits
        self._on_refusal = on_refusal
        self.counts: Counts = counts if counts is not None else ConnectionCounts(
            limits.max_connections_per_host, limits.max_associations)
        self.handoff = handoff

    def serve(self, ae, address, evt_handlers, ssl_context: ssl.SSLContext | None = None,
              passed_only: bool = False) -> GuardedAssociationServer:
        """``ae.start_server(address, block=False, ...)``, through the front door; `passed_only`:
        an extra SCP process's listener, which serves only connections the first one passes it."""
        server = ae.make_server(
            address,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            server_class=PassedConnectionServer if passed_only else GuardedAssociationServer,
            request_handler=_GuardedRequestHandler,
        )
        server.front_door = self
        if not passed_only:
            thread = threading.Thread(target=server.serve_forever, name=f"FrontDoor@{address[1]}", daemon=True)
            thread.start()
        ae._servers.append(server)  # as start_server does: AssociationServer.shutdown removes it
        return server

    def admit(self, host: str) -> str | None:
        """The SCP process (owner) to serve another connection from `host`; None when `host`
        holds ``max_connections_per_host`` already. Only the process that accepts asks."""
        assert isinstance(self.counts, ConnectionCounts), "only the first SCP process admits"
        return self.counts.admit(host)

    def pass_on(self, owner: str, host: str, connection: socket.socket, listener: str,
                address: tuple[str, int]) -> bool:
        """Pass a connection admitted for the extra process `owner` to it; False when that
        fails: it is counted for this process instead, which serves it."""
        if self.handoff is not None and self.handoff.pass_connection(owner, connection, listener, address):
            return True
        assert isinstance(self.counts, ConnectionCounts)
        self.counts.leave(owner)  # no new ones for it: it ends once it sees its link closed
        self.counts.move(host, owner, LOCAL)
        return False

    def release(self, host: str) -> None:
        try:
            self.counts.release(host)
        except CountsUnavailable:
            pass  # the failed link was shut down: the first process freed what this one held

    def claim_association(self, assoc) -> bool:
        """At its A-ASSOCIATE-RQ: may this connection become an association (``max_associations``)?
        Only connections that asked are counted, so silent ones (bounded by the per-host limit
        and the deadlines) cannot use up the slots; counted until the connection ends. Raises
        CountsUnavailable in an extra SCP process whose link to the first one failed."""
        conn = getattr(assoc.dul, "_front_door", None)
        if not isinstance(conn, _Connection):
            return True
        if conn.holds_association:
            return True
        if not self.counts.claim():  # CountsUnavailable: an extra process cut off from the first
            return False
        conn.holds_association = True
        return True

    def release_association(self) -> None:
        try:
            self.counts.unclaim()
        except CountsUnavailable:
            pass

    def report(self, refusal: Refusal) -> None:
        try:
            self._on_refusal(refusal)
        except Exception:  # the audit failing must not keep a hostile socket open
            log.exception("frontdoor.report_failed")
            log_event(log, logging.WARNING, f"connection.{refusal.result}", peer=f"{refusal.host}:{refusal.port}",
                      reason=refusal.reason)
