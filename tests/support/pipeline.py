"""Reading the node's job records from a running local stack."""

from __future__ import annotations

from dicom_node.index import Index
from dicom_node.local_stack.stack import LocalStack
from dicom_node.pipeline.jobs import Job, JobStore


def jobs_of(stack: LocalStack, study_uid: str) -> list[Job]:
    index = Index(f"sqlite:///{stack.workdir / 'node' / 'index.db'}")
    try:
        return JobStore(index).for_study(study_uid)
    finally:
        index.dispose()
