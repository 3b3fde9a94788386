"""ComparisonResult to a JSON-able dict (schema version 2; documented in the README).

Version 2 added, per region, `timepoints` (the finding at every study compared, oldest first),
`trend`, `lesion_type`, and `priors_compared` at the top level."""

from __future__ import annotations

from dataclasses import asdict

from .types import ChangeRegion, ComparisonResult, ReferenceUse, Timepoint

SCHEMA_VERSION = 2


def result_to_dict(result: ComparisonResult) -> dict:
    """Plain dict of the result; the overlay image is not included (see save_overlay_png)."""
    reg = result.registration
    return {
        "schema_version": SCHEMA_VERSION,
        "current": result.current_source,
        "prior": result.prior_source or None,
        "prior_date": result.prior_date.isoformat() if result.prior_date else None,
        "priors_compared": list(result.priors_compared),
        "no_prior": result.no_prior,
        "refused": result.refused,
        "summary": result.summary,
        "findings": list(result.findings),
        "sanity_flags": [{"code": f.code, "reason": f.reason, "blocking": f.blocking}
                         for f in result.sanity_flags],
        "registration": None if reg is None else {
            "ncc_before": reg.ncc_before, "ncc_after": reg.ncc_after,
            "succeeded": reg.succeeded, "transform": reg.transform,
        },
        "analysis_spacing_mm": list(result.analysis_spacing_mm),
        "regions": [_region(r) for r in result.regions],
        "seconds": result.seconds,
        "mode": result.mode,
        "references": [asdict(r) for r in result.references],
    }


def _region(r: ChangeRegion) -> dict:
    d = {
        "status": r.status,
        "confidence": r.confidence,
        "zone": r.zone,
        "kind": r.kind,
        "bbox": list(r.bbox),
        "area_mm2": r.area_mm2,
        "longest_diameter_mm": r.longest_diameter_mm,
        "mean_change": r.mean_change,
        "contour": [list(p) for p in r.contour],
        "lesion_type": r.lesion_type,
        "trend": r.trend or None,
        "timepoints": [_timepoint(t) for t in r.timepoints],
    }
    if r.volume_mm3 is not None:
        d["volume_mm3"] = r.volume_mm3
        d["bbox_3d"] = list(r.bbox_3d) if r.bbox_3d else None
        d["key_slice"] = r.key_slice
    return d


def _timepoint(t: Timepoint) -> dict:
    return {
        "date": t.date.isoformat() if t.date else None,
        "study_uid": t.study_uid or None,
        "sop_instance_uid": t.sop_instance_uid or None,
        "present": t.present,
        "long_axis_mm": t.long_axis_mm,
        "short_axis_mm": t.short_axis_mm,
        "area_mm2": t.area_mm2,
        "volume_mm3": t.volume_mm3,
        "contour": [list(p) for p in t.contour],
        "source": t.source,
    }


def _timepoint_from(d: dict) -> Timepoint:
    from datetime import date

    return Timepoint(
        date=date.fromisoformat(d["date"]) if d.get("date") else None,
        study_uid=d.get("study_uid") or "", sop_instance_uid=d.get("sop_instance_uid") or "",
        present=bool(d["present"]), long_axis_mm=d.get("long_axis_mm"), short_axis_mm=d.get("short_axis_mm"),
        area_mm2=d.get("area_mm2"), volume_mm3=d.get("volume_mm3"),
        contour=tuple(tuple(p) for p in d.get("contour", [])), source=d.get("source", ""),
    )


def result_from_dict(data: dict) -> ComparisonResult:
    """The inverse of result_to_dict (the overlay, kept apart as a PNG, comes back as None)."""
    from datetime import date

    from .types import RegistrationQuality, SanityFlag

    if data.get("schema_version") not in (1, SCHEMA_VERSION):  # 1: no time points (jobs from before the upgrade)
        raise ValueError(f"comparison schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    reg = data.get("registration")
    return ComparisonResult(
        regions=[_region_from(r) for r in data.get("regions", [])],
        sanity_flags=[SanityFlag(f["code"], f["reason"], bool(f["blocking"])) for f in data.get("sanity_flags", [])],
        registration=None if reg is None else RegistrationQuality(
            reg["ncc_before"], reg["ncc_after"], bool(reg["succeeded"]), reg.get("transform", "")),
        refused=bool(data.get("refused")),
        no_prior=bool(data.get("no_prior")),
        summary=data.get("summary", ""),
        findings=list(data.get("findings", [])),
        current_source=data.get("current") or "",
        prior_source=data.get("prior") or "",
        prior_date=date.fromisoformat(data["prior_date"]) if data.get("prior_date") else None,
        priors_compared=list(data.get("priors_compared", [])),
        analysis_spacing_mm=tuple(data.get("analysis_spacing_mm", ())),
        seconds=float(data.get("seconds", 0.0)),
        mode=data.get("mode", "prior"),
        references=[ReferenceUse(**r) for r in data.get("references", [])],
    )


def _region_from(d: dict) -> ChangeRegion:
    return ChangeRegion(
        zone=d["zone"],
        bbox=tuple(d["bbox"]),
        area_mm2=d["area_mm2"],
        longest_diameter_mm=d["longest_diameter_mm"],
        mean_change=d["mean_change"],
        status=d["status"],
        confidence=d["confidence"],
        contour=tuple(tuple(p) for p in d.get("contour", [])),
        volume_mm3=d.get("volume_mm3"),
        bbox_3d=tuple(d["bbox_3d"]) if d.get("bbox_3d") else None,
        key_slice=d.get("key_slice"),
        kind=d.get("kind", ""),
        timepoints=tuple(_timepoint_from(t) for t in d.get("timepoints", [])),
        trend=d.get("trend") or "",
        lesion_type=d.get("lesion_type", ""),
    )
