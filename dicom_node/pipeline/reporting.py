"""From a comparison to an SR in the durable delivery outbox, and from the outbox to the PACS."""

from __future__ import annotations

import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from ..report import ImageRef, ReportInput, StudyRef, build_overlay_sc, build_sr
from ..report.delivery import DONE, DeliveryQueue
from ..config import Settings
from ..index import Index
from .jobs import Job
from .runtime import Runtime, model_version

ENGINE_NAME = "dicom-node analysis engine"


def delivery_queue(rt: Runtime) -> DeliveryQueue:
    return queue_for(rt.settings, rt.index)


def queue_for(settings: Settings, index: Index) -> DeliveryQueue:
    """The durable delivery outbox: SR files under work_dir/outbox, rows in the index."""
    return DeliveryQueue(index, Path(settings.work_dir) / "outbox", settings.report, settings.ae_title)


def _refs(rows: list[dict]) -> list[ImageRef]:
    return [ImageRef(r["sop_class_uid"], r["sop_instance_uid"], r["series_uid"], r["study_uid"]) for r in rows]


def _study_ref(rt: Runtime, study_uid: str, rows: list[dict]) -> StudyRef:
    study = rt.index.study(study_uid) or {}
    return StudyRef(study_uid, study.get("study_date", ""), study.get("accession_number", ""), study.get("study_description", ""), _refs(rows))


def _predecessor(rt: Runtime, job: Job) -> tuple[ImageRef | None, int]:
    """The latest earlier report of this study (re-analysis), and how many there were."""
    earlier = [j for j in rt.jobs.for_study(job.study_uid) if j.job_key != job.job_key and j.result.get("sr_sop_instance_uid")]
    if not earlier:
        return None, 0
    last = earlier[-1].result
    return ImageRef(Comprehensive3DSRStorage, last["sr_sop_instance_uid"], last["sr_series_uid"], job.study_uid), len(earlier)


def report_input(rt: Runtime, job: Job, current_rows: list[dict], analysed: list[Path], current_image, priors: dict, result, vlm) -> ReportInput:
    analysed_set = {str(p) for p in analysed}
    current_images = [r for r in current_rows if r["path"] in analysed_set]
    by_path = {r["path"]: ref for r, ref in zip(current_images, _refs(current_images))}
    prior_refs = []
    for prior in priors.get("chosen", []):
        paths = set(prior.get("instance_paths", []))
        rows = [r for r in rt.index.study_instances(prior["study_uid"]) if r["path"] in paths]
        prior_refs.append(_study_ref(rt, prior["study_uid"], rows))
    predecessor, earlier = _predecessor(rt, job)
    settings = rt.settings
    return ReportInput(
        current_dataset=dcmread(analysed[0], stop_before_pixels=True),
        current=_study_ref(rt, job.study_uid, current_images),
        priors=prior_refs,
        comparison=result,
        vlm=vlm,
        model_name=settings.vlm_model or ENGINE_NAME,
        model_version=model_version(settings),
        algorithm_parameters={"vlm_backend": settings.vlm_backend if settings.vlm_model else "none", "job": job.job_key},
        input_key=job.job_key,
        predecessor=predecessor,
        instance_number=earlier + 1,
        # Volumes: regions sit on their key slice, so the SR must point at that slice's instance.
        slice_refs=[by_path[source] for source in current_image.slice_sources if source in by_path],
    )


def enqueue_report(rt: Runtime, inp: ReportInput) -> tuple[str, str]:
    """Write the SR (and the optional overlay) durably into the delivery outbox; returns its SOP Instance and Series UIDs."""
    queue = delivery_queue(rt)
    sr = build_sr(inp, rt.settings.report)
    queue.enqueue(sr)
    overlay = build_overlay_sc(inp, rt.settings.report)
    if overlay is not None:
        queue.enqueue(overlay)
    return str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID)


def deliver_pending(rt: Runtime, sr_uid: str) -> tuple[bool, str, float]:
    """Try every due delivery; returns (this SR accepted everywhere, last error, seconds until next try)."""
    queue = delivery_queue(rt)
    queue.deliver_due()
    rows = [row for row in queue.rows() if row.sop_instance_uid == sr_uid]
    waiting = [row for row in rows if row.status not in DONE]
    if not waiting:
        return True, "", 0.0
    next_try = max(0.5, min(row.next_attempt_at for row in waiting) - time.time())
    return False, "; ".join(f"{row.destination}: {row.last_error}" for row in waiting if row.last_error), next_try
