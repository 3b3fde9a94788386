"""The document /status answers with: counts, recent jobs and associations, pending deliveries."""

from __future__ import annotations

from ..index import Index
from ..pipeline.jobs import JobStore
from ..report.delivery import delivery_counts


def status_document(index: Index, limit: int = 20) -> dict:
    return {
        "deliveries": delivery_counts(index),
        "counts": index.counts(),
        "jobs_by_state": JobStore(index).counts(),
        "recent_jobs": [job.__dict__ for job in JobStore(index).list(limit)],
        "outbox_pending": [row.__dict__ for row in index.outbox_rows(pending_only=True)],
        "recent_associations": index.recent_associations(limit),
    }
