"""The PHI access audit: every read or disclosure of a patient's data, by whom, to whom, when.

Associations have their own audit table (the SCP writes it); this one records what the node
does with the data afterwards: queries to an archive for a patient's studies, retrievals of
prior studies, reading pixels for a comparison, reports sent to a PACS, results sent to the
RIS, and the prior candidates `dicom-node priors` shows an operator. Rows live in the index
(`phi_access`); `dicom-node audit` lists them. Patient IDs are stored hashed, like in the
logs: the study UID leads back to the patient through the index, for those allowed to look.

Rows are written once the access has happened. A row that cannot be written then (database
locked or gone) must not undo or repeat the access (a report sent twice, a lease left
behind): the whole record goes to the log at ERROR instead, so no access goes unrecorded.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, replace

from .index import Index
from .logs import log_event, phi_hash

log = logging.getLogger(__name__)

ARCHIVE_QUERY = "archive_query"  # C-FIND / QIDO-RS for the patient's studies
ARCHIVE_RETRIEVE = "archive_retrieve"  # C-MOVE / C-GET / WADO-RS of a prior study
IMAGE_READ = "image_read"  # pixels read for a comparison
REPORT_SENT = "report_sent"  # SR accepted by a PACS
WORKLIST_SENT = "worklist_sent"  # HL7 result accepted by the RIS
OPERATOR_VIEW = "operator_view"  # patient data shown by the CLI
REFERENCE_USED = "reference_used"  # a normal reference (another person, de-identified) compared with the patient's image
ACTIONS = (ARCHIVE_QUERY, ARCHIVE_RETRIEVE, IMAGE_READ, REPORT_SENT, WORKLIST_SENT, OPERATOR_VIEW, REFERENCE_USED)

_role = "dicom-node"


def set_role(role: str) -> None:
    """Name this process's part in the actor column (set once by each CLI entry point)."""
    global _role
    _role = role


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid {os.getuid()}"
    return f"{_role} {user}@{socket.gethostname()} pid {os.getpid()}"


@dataclass(frozen=True)
class PhiAccess:
    at: float
    actor: str
    action: str
    study_uid: str
    patient: str  # hashed
    peer: str = ""
    detail: str = ""


def record_access(
    index: Index, action: str, study_uid: str, peer: str = "", detail: str = "", patient_id: str | None = None
) -> PhiAccess:
    """Write one audit row; the patient is looked up from the index when not given."""
    if action not in ACTIONS:
        raise ValueError(f"unknown PHI access action {action!r}; expected one of {ACTIONS}")
    access = PhiAccess(time.time(), actor(), action, study_uid, phi_hash(patient_id or ""), peer, detail)
    try:
        if patient_id is None:
            access = replace(access, patient=phi_hash(index.patient_of(study_uid) or ""))
        index.record_phi_access(asdict(access))
    except Exception as exc:  # noqa: BLE001  (any database failure: the log keeps the record)
        log_event(log, logging.ERROR, "audit.write_failed", error=f"{type(exc).__name__}: {exc}", **asdict(access))
    return access
