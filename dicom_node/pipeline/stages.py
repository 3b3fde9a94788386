"""The work of each pipeline stage, without Celery: priors -> compare -> report -> deliver -> notify.

A stage reads only its job row and the previous stages' artifacts, does its work idempotently
(same inputs, same output UIDs), writes its own artifact atomically and returns its path with a
short summary for status pages; tasks.py commits both with the move to the next stage.
Errors are raised and classified by retry.py (transient, permanent or unknown).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .. import audit
from ..storage import write_atomic
from ..logs import log_event
from . import artifacts
from .jobs import Job
from .retry import DeliveryPending, PermanentJobError, TransientJobError
from .runtime import Runtime, model_version
from .vlm import vlm_enabled, vlm_model_name

log = logging.getLogger(__name__)

PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX"})
ENGINE_NAME = "dicom-node analysis engine"


@dataclass
class StageOutput:
    artifact: str | None  # path of the stage's artifact (None: the stage has none)
    summary: dict  # merged into the job's result (status pages, `dicom-node jobs`)


def job_dir(rt: Runtime, job: Job) -> Path:
    folder = Path(rt.settings.work_dir) / job.job_key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _artifact(job: Job, stage: str) -> Path:
    path = job.artifacts.get(stage)
    if not path:
        raise PermanentJobError(f"job {job.job_key}: stage {stage} recorded no artifact; run the job again (dicom-node retry)")
    return Path(path)


# --- priors ----------------------------------------------------------------------------


def run_priors(rt: Runtime, job: Job) -> StageOutput:
    from ..priors import retrieve_priors

    retrieval = retrieve_priors(rt.settings, rt.index, rt.ingestor, job.study_uid)
    path = job_dir(rt, job) / artifacts.PRIORS_FILE
    artifacts.write_priors(path, retrieval)
    chosen = [p.study_uid for p in retrieval.chosen]
    log_event(log, logging.INFO, "job.priors", job=job.job_key, chosen=chosen, warnings=retrieval.warnings)
    return StageOutput(str(path), {"priors": chosen, "prior_warnings": retrieval.warnings, "no_prior": retrieval.no_prior})


# --- compare ---------------------------------------------------------------------------


def _image_rows(rows: list[dict]) -> tuple[list[dict], bool]:
    """The instances to analyse from one study: the first projection image, or the first volume series."""
    from pydicom import dcmread

    images = sorted((r for r in rows if r["analysable"]), key=lambda r: (r["series_uid"], _number(r["instance_number"])))
    if not images:
        raise PermanentJobError("the study has no analysable image instances")
    first = dcmread(images[0]["path"], stop_before_pixels=True)
    if str(first.get("Modality", "")).upper() in PROJECTION_MODALITIES or int(first.get("NumberOfFrames", 1) or 1) > 1:
        return images[:1], False
    series = images[0]["series_uid"]
    return [r for r in images if r["series_uid"] == series], True


def _number(value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def load_image_input(paths: list[Path], volume: bool):
    from inference.pixels import load_image, load_series

    return load_series(paths) if volume else load_image(paths[0])


def _ref(row: dict):
    from ..refs import ImageRef

    return ImageRef(row["sop_class_uid"], row["sop_instance_uid"], row["series_uid"], row["study_uid"])


def _header(path: str) -> dict:
    """The first analysed instance's header as DICOM JSON (no pixels, no large binary values)."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _element: "")


def run_compare(rt: Runtime, job: Job) -> StageOutput:
    import inference
    from inference.overlay import save_overlay_png

    from ..refs import StudyRef

    retrieval = artifacts.read_priors(_artifact(job, "priors"))
    current_rows, volume = _image_rows(rt.index.study_instances(job.study_uid))
    current_paths = [Path(r["path"]) for r in current_rows]
    current = load_image_input(current_paths, volume)
    audit.record_access(rt.index, audit.IMAGE_READ, job.study_uid, detail=f"{len(current_paths)} instances, job {job.job_key}")
    usable = [prior for prior in retrieval.chosen if prior.instance_paths]
    prior_images = [_load_prior(rt, job, prior, volume) for prior in usable]
    result = inference.compare(current, prior_images,  # InputError: permanent (retry.py)
                               deformable=rt.settings.analysis_registration == "bspline")
    from ..references.stage import with_references

    result = with_references(rt, job, current, result, current_rows[0]["path"])  # no usable prior: normal references
    vlm = run_vlm(rt, current, prior_images, result, retrieval)

    folder = job_dir(rt, job)
    overlay = None
    if result.overlay is not None:
        overlay = folder / artifacts.OVERLAY_FILE
        save_overlay_png(result, overlay)
    study = rt.index.study(job.study_uid) or {}
    by_path = {r["path"]: r for r in current_rows}
    prior_refs = []
    for prior in usable:
        # the images compared, then the prior report the model was given (evidence of what was used)
        reports = {str(p) for p in prior.report_paths} if prior.report_text else set()
        paths = {str(p) for p in prior.instance_paths} | reports
        rows = sorted((r for r in rt.index.study_instances(prior.study_uid) if r["path"] in paths),
                      key=lambda r: r["path"] in reports)
        prior_refs.append(StudyRef(prior.study_uid, prior.study_date, prior.accession_number, prior.study_description,
                                   [_ref(r) for r in rows]))
    settings = rt.settings
    comparison = artifacts.Comparison(
        current=StudyRef(job.study_uid, study.get("study_date", ""), study.get("accession_number", ""),
                         study.get("study_description", ""), [_ref(r) for r in current_rows]),
        priors=prior_refs,
        # Volumes: regions sit on their key slice, so the SR must point at that slice's instance.
        slice_refs=[_ref(by_path[source]) for source in current.slice_sources if source in by_path],
        current_header=_header(current_rows[0]["path"]),
        prior_headers=[_header(str(prior.instance_paths[0])) for prior in usable],
        result=result,
        vlm=vlm,
        overlay_png=str(overlay) if overlay else None,
        prior_report=_prior_report(retrieval),
        model_name=vlm_model_name(settings) or ENGINE_NAME,
        model_version=model_version(settings),
        algorithm_parameters={"vlm_backend": settings.vlm_backend if vlm_enabled(settings) else "none", "job": job.job_key,
                              **_served_by(vlm)},
    )
    path = folder / artifacts.COMPARISON_FILE
    artifacts.write_comparison(path, comparison)
    for prior in retrieval.chosen:
        rt.index.release_prior(prior.study_uid)  # compared: the cache may evict it again
    return StageOutput(str(path), {
        "refused": result.refused,
        "no_prior": result.no_prior,
        "regions": [{"zone": r.zone, "status": r.status, "diameter_mm": round(r.longest_diameter_mm, 1)} for r in result.regions],
        "summary": result.summary,
        **_served_by(vlm),
    })


def _served_by(vlm) -> dict[str, str]:
    """Who answered, as a model server reported it (SR algorithm parameters and the job's result)."""
    if vlm is None or not vlm.served_model:
        return {}
    return {"vlm_served_model": vlm.served_model, "vlm_server_version": vlm.server_version or "unreported"}


def _prior_report(retrieval) -> str | None:
    chosen = retrieval.chosen
    return chosen[0].report_text if chosen else None


def _load_prior(rt: Runtime, job: Job, prior, volume: bool):
    image = load_image_input([Path(p) for p in prior.instance_paths], volume)
    audit.record_access(rt.index, audit.IMAGE_READ, prior.study_uid,
                        detail=f"{len(prior.instance_paths)} instances as prior of {job.study_uid}")
    return image


def run_vlm(rt: Runtime, current, prior_images, result, retrieval):
    """The VLM's reading when a model is configured; None (analysis engine alone) otherwise."""
    if not vlm_enabled(rt.settings):
        return None
    from ..references.stage import reference_images
    from .vlm import vlm_compare

    return vlm_compare(rt.settings, current, prior_images, result, _prior_report(retrieval), reference_images(rt, result))


# --- report ----------------------------------------------------------------------------


def _predecessor(rt: Runtime, job: Job):
    """The reading of the study's latest earlier report, which this job's report revises.
    An earlier job still building its report is waited for, so the two can never be unrelated."""
    from ..report.reading import Reading

    earlier = [j for j in rt.jobs.for_study(job.study_uid) if j.job_key != job.job_key and j.created_at <= job.created_at]
    building = [j for j in earlier if j.state == "report"]
    if building:
        raise TransientJobError(f"waiting for the report of earlier job {building[-1].job_key} of this study")
    reported = [j for j in earlier if j.artifacts.get("report")]
    if not reported:
        return None
    return Reading.from_json(Path(reported[-1].artifacts["report"]).read_bytes())


def _earlier_findings(rt: Runtime, job: Job) -> list:
    """Findings of earlier reports on the prior studies compared, to follow lesions by (report/tracking.py):
    this node's own reading of each prior study, and any TID 1500 SR among its retrieved reports."""
    from ..report import tracking
    from ..report.reading import Reading

    retrieval = artifacts.read_priors(_artifact(job, "priors"))
    found = []
    for prior in retrieval.chosen:
        reported = [j for j in rt.jobs.for_study(prior.study_uid) if j.artifacts.get("report")]
        if reported and Path(reported[-1].artifacts["report"]).is_file():
            found += tracking.from_reading(Reading.from_json(Path(reported[-1].artifacts["report"]).read_bytes()))
        found += tracking.from_files(prior.report_paths)
    return found


def run_report(rt: Runtime, job: Job) -> StageOutput:
    from pydicom.dataset import Dataset
    from pydicom.uid import Comprehensive3DSRStorage

    from ..refs import ImageRef
    from ..report import ReportInput, build_overlay_sc, build_sr
    from ..report.reading import build_reading
    from .reporting import delivery_queue

    comparison = artifacts.read_comparison(_artifact(job, "compare"))
    predecessor = _predecessor(rt, job)
    reading = build_reading(job.study_uid, comparison.result, comparison.vlm, predecessor, _earlier_findings(rt, job))
    if predecessor is not None:
        reading.predecessor_sr = ImageRef(Comprehensive3DSRStorage, predecessor.sr_sop_instance_uid,
                                          predecessor.sr_series_uid, job.study_uid)
    result = comparison.result
    if rt.settings.report.overlay_sc_enabled:
        result.overlay = artifacts.load_overlay(comparison)
    inp = ReportInput(
        current_dataset=Dataset.from_json(comparison.current_header),
        current=comparison.current,
        priors=comparison.priors,
        comparison=result,
        vlm=comparison.vlm,
        model_name=comparison.model_name,
        model_version=comparison.model_version,
        algorithm_parameters=comparison.algorithm_parameters,
        input_key=job.job_key,
        predecessor=reading.predecessor_sr,
        instance_number=reading.revision,
        slice_refs=comparison.slice_refs,
        reading=reading,
        prior_headers=[Dataset.from_json(h) for h in comparison.prior_headers],
    )
    queue = delivery_queue(rt)
    sr = build_sr(inp, rt.settings.report)
    reading.sr_sop_instance_uid, reading.sr_series_uid = str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID)
    overlay = build_overlay_sc(inp, rt.settings.report)
    path = job_dir(rt, job) / artifacts.READING_FILE
    if overlay is not None:
        reading.overlay_sop_instance_uid = str(overlay.SOPInstanceUID)
    write_atomic(path, reading.to_json())
    queue.enqueue(sr)  # durable, and the same SOP Instance UID on a re-run: enqueued once
    if overlay is not None:
        queue.enqueue(overlay)
    return StageOutput(str(path), {
        "sr_sop_instance_uid": reading.sr_sop_instance_uid,
        "sr_series_uid": reading.sr_series_uid,
        "impression": reading.impression,
        "changes": list(reading.changes),
        "revision": reading.revision,
        "predecessor_sr": reading.predecessor_sr.sop_instance_uid if reading.predecessor_sr else None,
    })


def read_reading(job: Job):
    from ..report.reading import Reading

    return Reading.from_json(Path(_artifact(job, "report")).read_bytes())


# --- deliver ---------------------------------------------------------------------------


def run_deliver(rt: Runtime, job: Job) -> StageOutput:
    from .reporting import deliver_pending

    reading = read_reading(job)
    objects = [uid for uid in (reading.sr_sop_instance_uid, reading.overlay_sop_instance_uid) if uid]
    accepted, last_error, retry_in = deliver_pending(rt, objects)
    if not accepted:
        raise DeliveryPending(f"SR {reading.sr_sop_instance_uid} not accepted yet: {last_error}", retry_in)
    return StageOutput(None, {"delivered": True})


# --- notify the worklist ---------------------------------------------------------------


def run_notify(rt: Runtime, job: Job) -> StageOutput:
    """HL7 ORU^R01 to the RIS (when configured), from the same reading as the SR: the worklist shows
    the result, flagged when something is new or worse; a revision goes out as a correction."""
    from pydicom.dataset import Dataset

    from ..worklist import WorklistResult, oru_message, send_result

    settings = rt.settings
    if not settings.worklist_hl7_host:
        return StageOutput(None, {"worklist": "not configured"})
    reading = read_reading(job)
    header = Dataset.from_json(artifacts.read_comparison(_artifact(job, "compare")).current_header)
    result = WorklistResult(
        patient_id=str(header.get("PatientID", "")),
        issuer=str(header.get("IssuerOfPatientID", "")),
        patient_name=str(header.get("PatientName", "")),
        birth_date=str(header.get("PatientBirthDate", "")),
        accession_number=str(header.get("AccessionNumber", "")),
        study_uid=job.study_uid,
        study_datetime=str(header.get("StudyDate", "")) + str(header.get("StudyTime", ""))[:6],
        impression=reading.impression,
        changes=reading.changes,
        sr_sop_instance_uid=reading.sr_sop_instance_uid,
        control_id=job.job_key,
        correction=reading.is_revision,
    )
    message = oru_message(result, settings.ae_title, settings.worklist_receiving_application)
    send_result(message, settings.worklist_hl7_host, settings.worklist_hl7_port, settings.worklist_timeout_seconds)
    audit.record_access(rt.index, audit.WORKLIST_SENT, job.study_uid, peer=f"{settings.worklist_hl7_host}:{settings.worklist_hl7_port}",
                        detail=f"ORU^R01 {job.job_key}", patient_id=result.patient_id)
    return StageOutput(None, {"worklist": "notified", "worklist_flagged": result.flagged})
