"""The finding itself, measured at every time point (not the region of change between two).

A region of change says where something changed; a reader wants the lesion's own size now and
before. For each region found between the current image and the most recent prior:

1. Footprint: the region of change with its holes filled (a grown nodule changes most in a ring
   around its smaller self), widened a little. Outside it, the time points agree.
2. Anatomy behind the finding: the image of a time point at which the finding is absent, where
   there is one (new: the prior; resolved: the current) -- anatomy is then exact, ribs and vessels
   included. Otherwise it is filled in from around the footprint, on the pixel-wise minimum of the
   time points (the smallest lesion), by straight interpolation across the footprint along rows or
   along columns, whichever predicts a ring of known pixels just outside it better (ribs run across
   the chest, the heart border and the spine down it).
3. Each time point's lesion signal is its image minus that anatomy. Presence at the current and
   the most recent prior follows the change profile (change.py); an older prior holds the finding
   when its signal peak exceeds 4 x the residual noise around it and 25 % of the largest peak.
   For a focal finding (at most 30 mm across) each time point is also read on its own: its image
   minus its own surroundings filled in across the region. A time point the profile called absent
   whose own peak exceeds 40 % of the larger of the pair it read (current and compared prior), or an
   older prior whose own peak exceeds 40 % of the largest time point's, holds the lesion: the profile
   reads a nodule that halved or doubled as one that vanished or appeared, and a larger lesion at an
   older visit reaches beyond the region found since. A shrinking finding is measured within its
   region of change widened by any overlapping region found against an older prior (pipeline.py):
   the lesion was larger then. (A projected sphere's peak scales with its
   diameter; what the fill gets wrong about anatomy stays below 0.35 on the phantoms.)
4. The lesion at a present time point is the connected set above 30 % of its own peak (a solid
   nodule's projection falls to 30 % at 95 % of its radius) and above 2.5 x the residual noise,
   on radiographs opened by one pixel first (one-pixel bridges to mis-filled anatomy cut).
   Long axis: largest distance across the outline; short axis: largest width perpendicular to it;
   area: pixel count. When the finding is present at every time point, the anatomy is filled in a
   second time from just around the smallest lesion found (closer, so more exact) and all time points
   are segmented again. Volumes use the same steps in 3D.

Status from the sizes (documented significance rule): present now and absent on the most recent
prior is `new`, the reverse `resolved`; present on both, the long axes are compared: the change
counts when it exceeds the combined uncertainty of the two measurements, each
max(2 analysis pixels, 10 % of the diameter), i.e. |d_now - d_before| > sqrt(u_now^2 + u_before^2);
then `worsened` (larger) or `improved` (smaller). Within that uncertainty, the region of change
itself decides when it was found between those two time points (it passed the subtraction's own
significance test, change.py): denser now `worsened`, less dense `improved`; otherwise `stable`. The trend compares the
oldest time point with the current one by the same rule (absent -> present `new`, present ->
absent `resolved`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from typing import Callable

import numpy as np

from .types import Timepoint

LEVEL_FRACTION = 0.30  # of the lesion's own peak signal
PRESENT_NOISE = 4.0  # an older prior holds the finding above this many residual sigmas ...
PRESENT_FRACTION = 0.25  # ... and above this fraction of the largest peak
EDGE_NOISE = 2.5
OPENING_PX = 1  # radiographs: the segmented lesion is opened by this many pixels (see _segment)
UNCERTAINTY_PX = 2.0  # one analysis pixel at each edge of a diameter
UNCERTAINTY_REL = 0.10
# A time point the change profile calls absent still holds the (smaller) lesion when its own signal peak,
# against its surroundings, exceeds this fraction of the largest time point's: a sphere's projected peak
# scales with its diameter, so half the size is half the peak; anatomy the fill misses stays near 0.1-0.3.
SMALLER_SELF = 0.40
FOCAL_MM = 30.0


@dataclass
class TimeImage:
    """One time point on the analysis grid (the current image's), ready to measure."""

    pixels: np.ndarray  # denoised; priors normalised to the current exposure and registered
    valid: np.ndarray  # bool: where this time point has data
    when: date | None
    study_uid: str
    sop_instance_uid: str
    source: str
    # analysis-grid indices (N, dim) -> this time point's own full-resolution pixel indices
    to_own_pixels: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class Measured:
    timepoints: list[Timepoint]
    status: str
    trend: str


def significant(d_before: float, d_now: float, pixel_mm: float) -> int:
    """+1 larger now, -1 smaller now, 0 within the two measurements' combined uncertainty."""
    u0 = max(UNCERTAINTY_PX * pixel_mm, UNCERTAINTY_REL * d_before)
    u1 = max(UNCERTAINTY_PX * pixel_mm, UNCERTAINTY_REL * d_now)
    delta = d_now - d_before
    return 0 if abs(delta) <= math.hypot(u0, u1) else (1 if delta > 0 else -1)


def compare_status(before: Timepoint, now: Timepoint, pixel_mm: float, change_sign: int = 0) -> str:
    """`change_sign`: the direction of a significant region of change found between these two time points
    (+1 denser now, -1 less dense, 0 none): it decides when the sizes alone do not (a lesion denser but
    no wider, or a size change within the sizes' uncertainty that the subtraction shows clearly)."""
    if now.present and not before.present:
        return "new"
    if before.present and not now.present:
        return "resolved"
    if not now.present:
        return "resolved"  # seen only in between: gone again
    sign = significant(before.long_axis_mm or 0.0, now.long_axis_mm or 0.0, pixel_mm) or change_sign
    return {1: "worsened", -1: "improved", 0: "stable"}[sign]


def measure_finding(mask: np.ndarray, offset: tuple[int, ...], times: list[TimeImage], recent: int,
                    present_now: bool | None, present_recent: bool, spacing: tuple[float, ...],
                    found_against: int | None = None, change_sign: int = 0) -> Measured:
    """`times` oldest first, the current last; `recent` is the index of the most recent prior;
    `found_against` the prior the region of change was found against (default: the most recent), whose
    presence (`present_recent`) and the current's came from the change profile.
    `mask`/`offset`: the region of change on the analysis grid."""
    known = recent if found_against is None else found_against
    from scipy import ndimage

    ndim = mask.ndim
    shape = times[-1].pixels.shape
    extent = max(mask.shape)
    margin = max(4, int(0.75 * extent))
    lo = [max(0, o - margin) for o in offset]
    hi = [min(n, o + m + margin) for o, m, n in zip(offset, mask.shape, shape)]
    if ndim == 3:  # slices are thick: a small margin across them
        lo[0], hi[0] = max(0, offset[0] - 2), min(shape[0], offset[0] + mask.shape[0] + 2)
    roi = tuple(slice(a, b) for a, b in zip(lo, hi))
    change = np.zeros([b - a for a, b in zip(lo, hi)], bool)
    inner = tuple(slice(o - a, o - a + m) for o, a, m in zip(offset, lo, mask.shape))
    change[inner] = mask
    footprint = _fill(ndimage.binary_closing(change, iterations=2) | change)
    widen = max(2, int(round(0.2 * _radius_px(footprint))))
    region = ndimage.binary_dilation(footprint, iterations=widen)
    stack = [t.pixels[roi].astype(np.float32) for t in times]
    valid = np.logical_and.reduce([t.valid[roi] for t in times])

    present: list[bool | None] = [None] * len(times)
    present[-1], present[known] = present_now, present_recent
    own: list[float] = []
    if _focal(footprint, spacing):
        # The change profile misreads a lesion that lost or gained half its size as one that vanished or
        # appeared (its smaller self barely dents the profile's core). The time point it calls absent is
        # looked at directly: its own image against its own surroundings filled in across the region.
        own = [_self_peak(s, region, footprint, valid) for s in stack]
        # against the other time point of the pair the profile read (an older, larger self of a
        # shrinking lesion would make the current one look absent by comparison)
        top_own = max(own[known], own[-1])
        for i, p in enumerate(present):
            if p is False and top_own > 0 and own[i] > SMALLER_SELF * top_own:
                present[i] = True
    absent = [i for i, p in enumerate(present) if p is False]
    background = stack[absent[-1]] if absent else _inpaint(np.minimum.reduce(stack), region, valid)
    ring = valid & ~ndimage.binary_dilation(region, iterations=1) & ndimage.binary_dilation(region, iterations=widen + 3)
    signals = [s - background for s in stack]
    noise = [max(_mad(sig[ring]) if ring.sum() > 8 else 0.0, 1e-6) for sig in signals]
    peaks = [float(np.percentile(sig[region], 98)) if region.any() else 0.0 for sig in signals]
    top = max([peaks[i] for i, p in enumerate(present) if p] or [max(peaks)])
    for i, p in enumerate(present):
        if p is None:
            present[i] = peaks[i] > PRESENT_NOISE * noise[i] and peaks[i] > PRESENT_FRACTION * top
            # a larger lesion before, reaching beyond the region found since, loses its peak to the fill
            present[i] = present[i] or bool(own and own[i] > SMALLER_SELF * max(own))
    if not absent and any(p is False for p in present):
        # an older prior without the finding: its image is the exact anatomy; measure again on it
        k = max(i for i, p in enumerate(present) if p is False)
        signals = [s - stack[k] for s in stack]
        peaks = [float(np.percentile(sig[region], 98)) for sig in signals]

    lesions = {i: _segment(signals[i], region, footprint, peaks[i], noise[i]) for i, p in enumerate(present) if p}
    if all(present) and lesions:
        # Present throughout: the anatomy came from around the largest footprint. Fill it in again from
        # just around the smallest lesion (M holds the anatomy outside it), closer and so more exact.
        smallest = min(lesions, key=lambda i: lesions[i].sum())
        if lesions[smallest].any():
            near = ndimage.binary_dilation(lesions[smallest], iterations=max(2, widen // 2)) & region
            background = _inpaint(np.minimum.reduce(stack), near, valid)
            signals = [s - background for s in stack]
            peaks = [float(np.percentile(sig[region], 98)) for sig in signals]
            lesions = {i: _segment(signals[i], region, footprint, peaks[i], noise[i]) for i in lesions}

    pixel_mm = float(min(spacing[-2:]))
    timepoints: list[Timepoint] = []
    for i, t in enumerate(times):
        if not present[i]:
            timepoints.append(Timepoint(t.when, t.study_uid, t.sop_instance_uid, False, source=t.source))
            continue
        lesion = lesions[i]
        if not lesion.any():
            lesion = footprint & (signals[i] > 0) if (footprint & (signals[i] > 0)).any() else footprint
        timepoints.append(_sizes(lesion, lo, spacing, t))
    # the region of change is significant between the current and the prior it was found against
    status = compare_status(timepoints[recent], timepoints[-1], pixel_mm, change_sign if known == recent else 0)
    trend = compare_status(timepoints[0], timepoints[-1], pixel_mm, change_sign if known in (0, recent) else 0)
    return Measured(timepoints, status, trend)


def _focal(footprint: np.ndarray, spacing: tuple[float, ...]) -> bool:
    """Compact and at most FOCAL_MM across: filling in anatomy across a wider region (an effusion) is not
    exact enough to tell a faint lesion from what the fill got wrong."""
    if footprint.ndim != 2 or not footprint.any():
        return False
    rows, cols = np.nonzero(footprint)
    extent = max((rows.max() - rows.min() + 1) * spacing[0], (cols.max() - cols.min() + 1) * spacing[1])
    return extent <= FOCAL_MM


def _self_peak(img: np.ndarray, region: np.ndarray, footprint: np.ndarray, valid: np.ndarray) -> float:
    """98th percentile, in the footprint, of the image above its own surroundings filled in across `region`."""
    return float(np.percentile((img - _inpaint(img, region, valid))[footprint], 98))


def _fill(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    if m.ndim == 3:
        return np.stack([ndimage.binary_fill_holes(s) for s in m])
    return ndimage.binary_fill_holes(m)


def _radius_px(m: np.ndarray) -> float:
    from scipy import ndimage

    if not m.any():
        return 1.0
    if m.ndim == 3:
        m = m[int(np.argmax(m.sum(axis=(1, 2))))]
    return float(ndimage.distance_transform_edt(np.pad(m, 1)).max())


def _mad(v: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size else 0.0


def _inpaint(img: np.ndarray, unknown: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fill `unknown` by straight interpolation from its edges, along the axis (of the last two) that
    predicts a ring of known pixels just outside it best."""
    from scipy import ndimage

    test = ndimage.binary_dilation(unknown, iterations=2) & valid
    check = test & ~unknown
    best, best_err = None, math.inf
    for axis in (img.ndim - 1, img.ndim - 2):
        trial = _interp_along(img, test, axis)
        err = float(np.mean(np.abs(trial[check] - img[check]))) if check.any() else 0.0
        if err < best_err:
            best, best_err = axis, err
    return _interp_along(img, unknown, best)


def _interp_along(img: np.ndarray, unknown: np.ndarray, axis: int) -> np.ndarray:
    a = np.moveaxis(img, axis, -1)
    u = np.moveaxis(unknown, axis, -1)
    out = a.copy()
    flat_a = out.reshape(-1, a.shape[-1])
    flat_u = u.reshape(-1, a.shape[-1])
    x = np.arange(a.shape[-1])
    for k in np.flatnonzero(flat_u.any(axis=1)):
        known = ~flat_u[k]
        if known.sum() < 2:
            continue
        flat_a[k, ~known] = np.interp(x[~known], x[known], flat_a[k, known])
    return np.moveaxis(out, -1, axis)


def _segment(signal: np.ndarray, region: np.ndarray, footprint: np.ndarray, peak: float, noise: float) -> np.ndarray:
    from scipy import ndimage

    level = max(LEVEL_FRACTION * peak, EDGE_NOISE * noise)
    above = (signal > level) & region
    if above.ndim == 2:
        # cut one-pixel bridges to anatomy the fill got slightly wrong (a small lesion at one time
        # point, in a region sized for its larger self at another, otherwise bled into them)
        opened = ndimage.binary_opening(above, iterations=OPENING_PX)
        if opened.any():
            above = opened
    lab, n = ndimage.label(above)
    if n == 0:
        return above
    # the component(s) the change footprint touches most
    overlap = ndimage.sum(footprint, lab, range(1, n + 1))
    keep = 1 + int(np.argmax(overlap))
    return _fill(lab == keep)


def _sizes(lesion: np.ndarray, lo: list[int], spacing: tuple[float, ...], t: TimeImage) -> Timepoint:
    from .change import contour_2d, longest_diameter_mm

    if lesion.ndim == 3:
        k = int(np.argmax(lesion.sum(axis=(1, 2))))
        key, sp2 = lesion[k], spacing[1:]
        pts = np.argwhere(lesion)
        long_axis = longest_diameter_mm(pts, spacing)
        volume = float(lesion.sum() * np.prod(spacing))
    else:
        key, sp2 = lesion, spacing
        volume = None
    outline = np.array(contour_2d(key))
    if lesion.ndim == 2:
        long_axis = longest_diameter_mm(outline if len(outline) > 1 else np.argwhere(key), sp2)
    short_axis = _short_axis(np.argwhere(key), sp2)
    contour: tuple = ()
    if lesion.ndim == 2 and t.to_own_pixels is not None and len(outline):
        own = t.to_own_pixels(outline + np.array(lo[-2:]))
        contour = tuple((int(round(r)), int(round(c))) for r, c in own)
    return Timepoint(t.when, t.study_uid, t.sop_instance_uid, True, round(long_axis, 1), round(short_axis, 1),
                     round(float(key.sum() * sp2[0] * sp2[1]), 1), None if volume is None else round(volume, 1),
                     contour, t.source)


def _short_axis(pts: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Largest width perpendicular to the long axis (the long axis from the point cloud's extremes)."""
    if len(pts) < 2:
        return float(max(spacing))
    xy = pts.astype(np.float64) * np.asarray(spacing, float)
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1) if len(xy) <= 1500 else None
    if d2 is None:
        centre = xy.mean(0)
        _, _, vt = np.linalg.svd(xy - centre, full_matrices=False)
        direction = vt[0]
    else:
        i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
        direction = xy[j] - xy[i]
        norm = float(np.linalg.norm(direction))
        direction = direction / norm if norm > 0 else np.array([1.0, 0.0])
    normal = np.array([-direction[1], direction[0]])
    proj = xy @ normal
    return float(proj.max() - proj.min() + max(spacing))
