"""Lesions followed across reports: the Tracking Identifier and UID a finding had in an earlier report.

Sources of earlier findings, per prior study compared:
- this node's own reading of that study (its Reading, kept by the report stage), and
- any TID 1500 SR in the prior study (this node's or another vendor's): each measurement group's
  Tracking Identifier / Tracking Unique Identifier and the image region it outlines.

A finding of the current report takes an earlier finding's tracking when, on the same prior image, the
outline it was measured with lies within the earlier outline's reach (its centre closer than the larger
of the two extents, at least 10 pixels). A finding that matches none keeps the UID derived for it now,
and later reports find it in this report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MEASUREMENT_GROUP = "125007"
TRACKING_ID = "112039"
TRACKING_UID = "112040"
MIN_REACH_PX = 10.0


@dataclass(frozen=True)
class TrackedFinding:
    tracking_uid: str
    tracking_id: str
    sop_instance_uid: str  # the image the earlier outline is on
    centre: tuple[float, float]  # (row, col) in that image's pixels
    extent_px: float


def from_points(uid: str, identifier: str, sop: str, rows_cols: np.ndarray) -> TrackedFinding | None:
    if not uid or not sop or len(rows_cols) < 1:
        return None
    pts = np.asarray(rows_cols, float)
    return TrackedFinding(uid, identifier, sop, (float(pts[:, 0].mean()), float(pts[:, 1].mean())),
                          float(np.ptp(pts, axis=0).max()) if len(pts) > 1 else 0.0)


def from_reading(reading) -> list[TrackedFinding]:
    """This node's earlier reading of a prior study: every time point outline of every finding."""
    out = []
    for f in reading.findings:
        region = f.region
        for tp in (region.timepoints if region is not None else ()):
            if tp.present and tp.contour:
                found = from_points(f.tracking_uid, f.tracking_id, tp.sop_instance_uid, np.array(tp.contour))
                if found:
                    out.append(found)
    return out


def from_sr(ds) -> list[TrackedFinding]:
    """Measurement groups of a TID 1500 SR with a tracking UID and a 2D image region."""
    out: list[TrackedFinding] = []

    def code(item) -> str:
        seq = item.get("ConceptNameCodeSequence")
        return str(seq[0].CodeValue) if seq else ""

    def groups(items):
        for item in items:
            if item.get("ValueType") == "CONTAINER" and code(item) == MEASUREMENT_GROUP:
                yield item
            elif "ContentSequence" in item:
                yield from groups(item.ContentSequence)

    for group in groups(ds.get("ContentSequence", [])):
        uid = identifier = ""
        regions = []
        for item in _walk(group.get("ContentSequence", [])):
            if code(item) == TRACKING_UID and item.get("ValueType") == "UIDREF":
                uid = str(item.UID)
            elif code(item) == TRACKING_ID and item.get("ValueType") == "TEXT":
                identifier = str(item.TextValue)
            elif item.get("ValueType") == "SCOORD":
                images = [c for c in item.get("ContentSequence", []) if c.get("ValueType") == "IMAGE"]
                if images:
                    xy = np.asarray([float(v) for v in item.GraphicData]).reshape(-1, 2)
                    sop = str(images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                    regions.append((sop, xy[:, ::-1] - 0.5))  # (column, row) pixel edges -> (row, col) centres
        for sop, rows_cols in regions:
            found = from_points(uid, identifier, sop, rows_cols)
            if found:
                out.append(found)
    return out


def _walk(items):
    for item in items:
        yield item
        if "ContentSequence" in item and item.get("ValueType") != "CONTAINER":
            yield from _walk(item.ContentSequence)


def from_files(paths) -> list[TrackedFinding]:
    """Every TID 1500 SR among a prior study's report files (others are skipped)."""
    from pydicom import dcmread

    out = []
    for path in paths:
        try:
            ds = dcmread(str(path))
        except Exception as exc:  # a report we cannot read only loses tracking, never the job
            log.warning("tracking: cannot read %s: %s", Path(path).name, exc)
            continue
        if str(ds.get("Modality", "")) == "SR":
            out.extend(from_sr(ds))
    return out


def match(region, earlier: list[TrackedFinding]) -> TrackedFinding | None:
    """The earlier finding at the same place as `region` (a ChangeRegion with time points) on a prior image."""
    best, best_d = None, float("inf")
    for tp in region.timepoints[:-1]:
        if not (tp.present and tp.contour):
            continue
        pts = np.asarray(tp.contour, float)
        centre = pts.mean(axis=0)
        extent = float(np.ptp(pts, axis=0).max())
        for e in earlier:
            if e.sop_instance_uid != tp.sop_instance_uid:
                continue
            d = float(np.hypot(*(centre - np.asarray(e.centre))))
            if d <= max(extent, e.extent_px, MIN_REACH_PX) and d < best_d:
                best, best_d = e, d
    return best
