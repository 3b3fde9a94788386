"""ComparisonResult to a JSON-able dict (schema version 1; documented in the README)."""

from __future__ import annotations

from .types import ChangeRegion, ComparisonResult

SCHEMA_VERSION = 1


def result_to_dict(result: ComparisonResult) -> dict:
    """Plain dict of the result; the overlay image is not included (see save_overlay_png)."""
    reg = result.registration
    return {
        "schema_version": SCHEMA_VERSION,
        "current": result.current_source,
        "prior": result.prior_source or None,
        "prior_date": result.prior_date.isoformat() if result.prior_date else None,
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
    }
    if r.volume_mm3 is not None:
        d["volume_mm3"] = r.volume_mm3
        d["bbox_3d"] = list(r.bbox_3d) if r.bbox_3d else None
        d["key_slice"] = r.key_slice
    return d


def result_from_dict(data: dict) -> ComparisonResult:
    """The inverse of result_to_dict (the overlay, kept apart as a PNG, comes back as None)."""
    from datetime import date

    from .types import RegistrationQuality, SanityFlag

    if data.get("schema_version") != SCHEMA_VERSION:
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
        analysis_spacing_mm=tuple(data.get("analysis_spacing_mm", ())),
        seconds=float(data.get("seconds", 0.0)),
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
    )
