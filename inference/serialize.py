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
