"""The PHI access audit: every read or disclosure of a patient's data, by whom, to whom, when.

Associations have their own audit table (the SCP writes it); this one records what the node
does with the data afterwards: queries to an archive for a patient's studies, retrievals of
prior studies, reading pixels for a comparison, reports sent to a PACS, results sent to the
RIS, and what an operator looks at through the CLI. Rows live in the index (`phi_access`);
`dicom-node audit` lists them. Patient IDs are stored hashed, like in the logs: the study
UID leads back to the patient through the index, for those allowed to look.

An access that cannot be audited fails with the operation (both use the same database), so
nothing reads or discloses PHI without its row.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from dataclasses import asdict, dataclass

from .index import Index
from .logs import phi_hash

ARCHIVE_QUERY = "archive_query"  # C-FIND / QIDO-RS for the patient's studies
ARCHIVE_RETRIEVE = "archive_retrieve"  # C-MOVE / C-GET / WADO-RS of a prior study
IMAGE_READ = "image_read"  # pixels read for a comparison
REPORT_SENT = "report_sent"  # SR accepted by a PACS
WORKLIST_SENT = "worklist_sent"  # HL7 result accepted by the RIS
OPERATOR_VIEW = "operator_view"  # patient data shown by the CLI
ACTIONS = (ARCHIVE_QUERY, ARCHIVE_RETRIEVE, IMAGE_READ, REPORT_SENT, WORKLIST_SENT, OPERATOR_VIEW)

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
    if patient_id is None:
        patient_id = index.patient_of(study_uid) or ""
    access = PhiAccess(time.time(), actor(), action, study_uid, phi_hash(patient_id), peer, detail)
    index.record_phi_access(asdict(access))
    return access
