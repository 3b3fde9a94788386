"""Reading the node's job records from a running local stack, and studies to send it."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from dicom_node.index import Index
from dicom_node.local_stack.stack import MODALITY_AE, NODE_AE, LocalStack
from dicom_node.pipeline.jobs import Job, JobStore
from dicom_node.scu import Peer, send


def jobs_of(stack: LocalStack, study_uid: str) -> list[Job]:
    index = Index(f"sqlite:///{stack.workdir / 'node' / 'index.db'}")
    try:
        return JobStore(index).for_study(study_uid)
    finally:
        index.dispose()


def new_patient_study(folder: Path, number: int, change: str = "new_nodule") -> tuple[str, Path]:
    """A current chest radiograph of a patient the archive knows nothing about."""
    from inference.phantoms import PatientInfo, make_chest_pair

    patient = PatientInfo(patient_id=f"FAULT-{number:03d}", current_date=date(2026, 11, 1), current_accession=f"F{number:05d}")
    pair = make_chest_pair(100 + number, change, size=256, patient=patient)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"study{number}.dcm"
    pair.current.save_as(path, enforce_file_format=True)
    return str(pair.current.StudyInstanceUID), path


def poison_study(folder: Path, number: int) -> tuple[str, Path]:
    """A study that decodes but cannot be measured (a negative PixelSpacing; 0\\0 means "not
    calibrated" and is measured in pixels): its job fails at compare."""
    from pydicom import dcmread

    uid, path = new_patient_study(folder, number)
    ds = dcmread(path)
    ds.PixelSpacing = [-0.2, -0.2]
    ds.save_as(path)
    return uid, path


def send_to_node(stack: LocalStack, *paths: Path) -> None:
    report = send(Peer("127.0.0.1", stack.ports.node, NODE_AE), list(paths), MODALITY_AE)
    assert report.sent == len(paths) and not report.failed, report.failed
