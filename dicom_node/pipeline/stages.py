"""The work of each pipeline stage, without Celery: priors -> compare (+ SR) -> deliver.

Each stage reads its inputs from the index and the job's folder and writes its outputs
there before the task is acknowledged, so a re-run after a crash repeats the same work
with the same inputs and produces the same UIDs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from pydicom import dcmread

from .. import audit
from ..logs import log_event
from .jobs import Job
from .runtime import Runtime

log = logging.getLogger(__name__)

PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX"})


class PermanentJobError(Exception):
    """Retrying cannot help (bad input, configuration): the job fails at once with this message."""


class DeliveryPending(Exception):
    """The SR is in the durable outbox but not accepted yet; retried (without limit) when next due."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


def job_dir(rt: Runtime, job: Job) -> Path:
    folder = Path(rt.settings.work_dir) / job.job_key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_json(path: Path, data: dict) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(data, indent=2, default=str))
    temp.replace(path)


# --- priors ----------------------------------------------------------------------------


def run_priors(rt: Runtime, job: Job) -> dict:
    from ..priors import RetrieveRefused, retrieve_priors

    try:
        retrieval = retrieve_priors(rt.settings, rt.index, rt.ingestor, job.study_uid)
    except RetrieveRefused as exc:
        raise PermanentJobError(str(exc)) from exc
    _write_json(job_dir(rt, job) / "priors.json", dataclasses.asdict(retrieval))
    chosen = [p.study_uid for p in retrieval.chosen]
    log_event(log, logging.INFO, "job.priors", job=job.job_key, chosen=chosen, warnings=retrieval.warnings)
    return {"priors": chosen, "prior_warnings": retrieval.warnings, "no_prior": retrieval.no_prior}


def load_priors(rt: Runtime, job: Job) -> dict:
    path = job_dir(rt, job) / "priors.json"
    if not path.exists():
        raise PermanentJobError(f"job {job.job_key}: prior retrieval left no {path.name}; retry the job")
    return json.loads(path.read_text())


# --- compare + SR ----------------------------------------------------------------------


def _image_paths(rows: list[dict]) -> tuple[list[Path], bool]:
    """The instances to analyse from one study: the first projection image, or the first volume series."""
    images = sorted((r for r in rows if r["analysable"]), key=lambda r: (r["series_uid"], _number(r["instance_number"])))
    if not images:
        raise PermanentJobError("the study has no analysable image instances")
    first = dcmread(images[0]["path"], stop_before_pixels=True)
    if str(first.get("Modality", "")).upper() in PROJECTION_MODALITIES or int(first.get("NumberOfFrames", 1) or 1) > 1:
        return [Path(images[0]["path"])], False
    series = images[0]["series_uid"]
    return [Path(r["path"]) for r in images if r["series_uid"] == series], True


def _number(value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def load_image_input(paths: list[Path], volume: bool):
    from inference.pixels import load_image, load_series

    return load_series(paths) if volume else load_image(paths[0])


def run_compare(rt: Runtime, job: Job) -> dict:
    import inference
    from inference.errors import InputError

    from ..report import ReportInput
    from .reporting import enqueue_report, report_input

    current_rows = rt.index.study_instances(job.study_uid)
    current_paths, volume = _image_paths(current_rows)
    priors = load_priors(rt, job)
    try:
        current = load_image_input(current_paths, volume)
        audit.record_access(rt.index, audit.IMAGE_READ, job.study_uid, detail=f"{len(current_paths)} instances, job {job.job_key}")
        prior_images = [_load_prior(rt, job, prior, volume) for prior in priors["chosen"] if prior["instance_paths"]]
        result = inference.compare(current, prior_images)
    except InputError as exc:
        raise PermanentJobError(f"input refused: {exc}") from exc
    vlm = run_vlm(rt, current, prior_images, result, priors)
    inp: ReportInput = report_input(rt, job, current_rows, current_paths, current, priors, result, vlm)
    sr_uid, sr_series = enqueue_report(rt, inp)
    from inference.serialize import result_to_dict

    _write_json(job_dir(rt, job) / "comparison.json", result_to_dict(result))
    for prior in priors.get("chosen", []):
        rt.index.release_prior(prior["study_uid"])  # compared: the cache may evict it again
    usable_vlm = vlm is not None and vlm.usable
    return {
        "impression": vlm.impression if usable_vlm and vlm.impression else result.summary,
        "changes": [r.status for r in result.regions] + ([f.change for f in vlm.findings] if usable_vlm else []),
        "sr_sop_instance_uid": sr_uid,
        "sr_series_uid": sr_series,
        "refused": result.refused,
        "no_prior": result.no_prior,
        "regions": [{"zone": r.zone, "status": r.status, "diameter_mm": round(r.longest_diameter_mm, 1)} for r in result.regions],
        "summary": result.summary,
    }


def _load_prior(rt: Runtime, job: Job, prior: dict, volume: bool):
    image = load_image_input([Path(p) for p in prior["instance_paths"]], volume)
    audit.record_access(rt.index, audit.IMAGE_READ, prior["study_uid"],
                        detail=f"{len(prior['instance_paths'])} instances as prior of {job.study_uid}")
    return image


def run_vlm(rt: Runtime, current, prior_images, result, priors: dict):
    """The VLM's reading when a model is configured; None (analysis engine alone) otherwise."""
    if not rt.settings.vlm_model:
        return None
    from .vlm import vlm_compare

    return vlm_compare(rt.settings, current, prior_images, result, priors)


# --- deliver ---------------------------------------------------------------------------


def run_deliver(rt: Runtime, job: Job) -> dict:
    from .reporting import deliver_pending

    sr_uid = job.result.get("sr_sop_instance_uid")
    if not sr_uid:
        raise PermanentJobError("no SR was written for this job; retry it from the start")
    accepted, last_error, retry_in = deliver_pending(rt, sr_uid)
    if not accepted:
        raise DeliveryPending(f"SR {sr_uid} not accepted yet: {last_error}", retry_in)
    return {"delivered": True}


# --- notify the worklist ---------------------------------------------------------------


def run_notify(rt: Runtime, job: Job) -> dict:
    """HL7 ORU^R01 to the RIS (when configured): the worklist shows the result, flagged when worse."""
    from ..worklist import WorklistRejected, WorklistResult, oru_message, send_result

    settings = rt.settings
    if not settings.worklist_hl7_host:
        return {"worklist": "not configured"}
    study = rt.index.study_overview(job.study_uid) or {}
    result = WorklistResult(
        patient_id=study.get("patient_id", ""),
        issuer=study.get("issuer", ""),
        patient_name=study.get("patient_name", ""),
        birth_date=study.get("birth_date", ""),
        accession_number=study.get("accession_number", ""),
        study_uid=job.study_uid,
        study_datetime=(study.get("study_date", "") + study.get("study_time", "")[:6]),
        impression=job.result.get("impression", ""),
        changes=tuple(job.result.get("changes", [])),
        sr_sop_instance_uid=job.result.get("sr_sop_instance_uid", ""),
        control_id=job.job_key,
    )
    message = oru_message(result, settings.ae_title, settings.worklist_receiving_application)
    try:
        send_result(message, settings.worklist_hl7_host, settings.worklist_hl7_port, settings.worklist_timeout_seconds)
    except WorklistRejected as exc:
        raise PermanentJobError(str(exc)) from exc
    audit.record_access(rt.index, audit.WORKLIST_SENT, job.study_uid, peer=f"{settings.worklist_hl7_host}:{settings.worklist_hl7_port}",
                        detail=f"ORU^R01 {job.job_key}", patient_id=result.patient_id)
    return {"worklist": "notified", "worklist_flagged": result.flagged}
