"""Worklist notification: an HL7 v2.5.1 ORU^R01 result message to the RIS over MLLP, so the
radiology worklist shows the node's result and flags studies where something is new or worse."""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass

import hl7
from hl7.client import MLLPClient

# Changes that make the worklist entry abnormal (HL7 OBX-8 "A") and the result urgent.
FLAGGED_CHANGES = frozenset({"new", "worsened"})


class WorklistRejected(Exception):
    """The RIS refused the message (MSA-1 AR/CR): resending the same message cannot help."""


class WorklistUnavailable(Exception):
    """No answer, or an application error (AE/CE): worth retrying."""


@dataclass(frozen=True)
class WorklistResult:
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    accession_number: str
    study_uid: str
    study_datetime: str  # YYYYMMDDHHMMSS
    impression: str
    changes: tuple[str, ...]  # the change status of every finding
    sr_sop_instance_uid: str
    control_id: str  # unique per result message (the job key): the RIS can drop a resend
    correction: bool = False  # a revised result (re-analysis after late images): result status C, not F

    @property
    def flagged(self) -> bool:
        return any(change in FLAGGED_CHANGES for change in self.changes)


def _escape(text: str) -> str:
    """HL7 escape sequences for the delimiters, and no line breaks inside a field."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("~", "\\R\\").replace("&", "\\T\\")
    return " ".join(out.split())


def oru_message(result: WorklistResult, sending_application: str, receiving_application: str, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now()
    stamp = now.strftime("%Y%m%d%H%M%S")
    flag = "A" if result.flagged else "N"
    status = "C" if result.correction else "F"  # OBR-25 / OBX-11 result status: final, or corrected
    priority = "urgent" if result.flagged else "routine"
    segments = [
        f"MSH|^~\\&|{_escape(sending_application)}||{_escape(receiving_application)}||{stamp}||ORU^R01^ORU_R01|{result.control_id[:20]}|P|2.5.1",
        f"PID|1||{_escape(result.patient_id)}^^^{_escape(result.issuer)}||{result.patient_name.replace('|', ' ')}||{result.birth_date}",
        f"OBR|1|{_escape(result.accession_number)}|{_escape(result.accession_number)}|AICOMP^AI comparison with prior^L|||{result.study_datetime}"
        + "|" * 15 + f"{stamp}|||{status}",
        f"OBX|1|TX|IMP^Impression^L||{_escape(result.impression)}||||||{status}",
        f"OBX|2|ST|PRIO^AI priority^L||{priority}|||{flag}|||{status}",
        f"OBX|3|ST|SRUID^Structured Report SOP Instance UID^L||{result.sr_sop_instance_uid}||||||{status}",
        f"OBX|4|ST|STUID^Study Instance UID^L||{result.study_uid}||||||{status}",
    ]
    return "\r".join(segments)


def send_result(message: str, host: str, port: int, timeout: float) -> str:
    """Send over MLLP and check the acknowledgement; returns the RIS's MSA text."""
    try:
        with MLLPClient(host, port) as client:
            client.socket.settimeout(timeout)
            client.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw = client.send_message(message)
    except OSError as exc:
        raise WorklistUnavailable(f"RIS HL7 listener {host}:{port} unreachable: {exc}") from exc
    text = raw.decode("utf-8", "replace").strip("\x0b\x1c\r\n ")
    try:
        msa = hl7.parse(text).segment("MSA")
        code, detail = str(msa[1]), str(msa[3]) if len(msa) > 3 else ""
    except (KeyError, IndexError, hl7.ParseException) as exc:
        raise WorklistUnavailable(f"RIS {host}:{port} answered without an MSA acknowledgement: {text[:200]!r}") from exc
    if code in ("AA", "CA"):
        return detail
    if code in ("AR", "CR"):
        raise WorklistRejected(f"RIS {host}:{port} rejected the result message ({code}): {detail}")
    raise WorklistUnavailable(f"RIS {host}:{port} could not process the result message ({code}): {detail}")
