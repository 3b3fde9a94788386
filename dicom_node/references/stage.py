"""The compare stage's reference step: when the patient has no usable prior (none retrieved, or every
one refused by the sanity gate), compare the current image with matched normal references instead;
with references.beside_prior, also beside a prior comparison (its findings are added, its regions are
not: the SR's measurement groups are the prior comparison's)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .. import audit
from ..logs import log_event
from .encoder import encoder_for
from .library import Library
from .select import query_for, select_references
from .use import load_references

log = logging.getLogger(__name__)

_HEADER_KEYS = ("PatientSex", "PatientAge", "PatientBirthDate", "StudyDate")


def with_references(rt, job, current, result, current_path: str):
    """The comparison result to keep: `result`, or the comparison against normal references."""
    settings = rt.settings.references
    no_prior = result.no_prior or result.refused
    if not settings.enabled or current.is_volume or not (no_prior or settings.beside_prior):
        return result
    from pydicom import dcmread

    from inference.references import compare_with_references

    header = dcmread(current_path, stop_before_pixels=True)
    library = Library(settings.library_dir)
    keys = {k: str(header.get(k, "") or "") for k in _HEADER_KEYS}
    selection = select_references(library.records(), query_for(current, keys, encoder_for(rt.settings)), settings.count)
    if not selection.chosen:
        log_event(log, logging.INFO, "job.references_none", job=job.job_key, reason=selection.reason)
        return replace(result, summary=f"{result.summary} No normal reference used: {selection.reason}.".strip())
    images, uses = load_references(library, selection)
    for choice in selection.chosen:
        audit.record_access(rt.index, audit.REFERENCE_USED, job.study_uid,
                            detail=f"reference {choice.record.sop_instance_uid}: {choice.why}; job {job.job_key}")
    against = compare_with_references(current, images, uses)
    log_event(log, logging.INFO, "job.references", job=job.job_key, references=[u.sop_instance_uid for u in uses],
              regions=len(against.regions))
    if no_prior:
        against.sanity_flags = result.sanity_flags + against.sanity_flags  # why the prior was not usable
        return against
    return replace(result, references=against.references,
                   findings=result.findings + [f"vs normal references: {f}" for f in against.findings],
                   summary=f"{result.summary} Against normal references of other people: {against.summary}")


def reference_images(rt, result) -> list:
    """The references shown to the VLM next to the query (the first references.prompt_count registered)."""
    from inference.pixels import load_image

    if result.mode != "reference":
        return []
    root = Path(rt.settings.references.library_dir)
    shown = [u for u in result.references if u.registered][: rt.settings.references.prompt_count]
    return [(load_image(root / u.source), u.why) for u in shown]
