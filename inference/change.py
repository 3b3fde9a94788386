"""Change map and measured regions between a current image and a registered prior (2D or 3D).

Steps: intensity normalisation of the prior to the current exposure (robust
quadratic tone curve plus a smooth spatial trend for heel effect / scatter),
Gaussian denoising, a difference map that tolerates sub-pixel misregistration
(the current is compared with the local min..max of the prior, so edges of ribs
and the heart that moved by a fraction of a pixel do not light up), noise
scaling to z-scores, hysteresis thresholding and connected components.

Each component is measured and given a status from the shared vocabulary: for
radiographs from the profile of the change (a lesion that appeared or vanished
changes most at its centre; one that grew or shrank keeps its smaller self in the
middle), which is free of superimposed anatomy; for volumes from the lesion's
calibrated contrast at the other time point.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

Z_SEED = 5.0  # a region needs at least one pixel this far above the noise
Z_GROW = 2.5  # and extends to where the change stays above this
MIN_MEAN_Z = 4.5
MIN_AREA_MM2 = 14.0  # ~4.2 mm disc (a 6-7 mm nodule after the tolerant difference eats its rim); smaller is below what the denoised map can resolve
MIN_VOLUME_MM3 = 100.0  # ~6 mm sphere
Z_SEED_3D = 6.0  # a volume has many more voxels in which noise can reach Z_SEED
VOLUME_PRESENT_RATIO = 0.2  # volumes: lesion contrast at the other time point / change
PROFILE_RATIO = 1.0  # core/annulus change below which the lesion exists at both time points
DENOISE_MM = 1.2
LOSSY_DENOISE_MAX_MM = 8.0
MIN_INRADIUS_MM = 1.5
TOLERANCE_PX = 5  # +-2 analysis pixels (~1.7 mm at 512 px): residual misregistration at the film's corners
THICKNESS_RATIO = 0.08  # inradius / bounding extent below which a region is an edge band
# Denser knots in the bright tail, where bone and mediastinum sit and processing curves bend most.
_TONE_QUANTILES = np.concatenate([np.linspace(0, 0.9, 10), [0.95, 0.98, 0.995, 1.0]])
_DEBUG = bool(os.environ.get("INFERENCE_CHANGE_DEBUG"))  # print per-region statistics while tuning


@dataclass
class ChangeMap:
    diff: np.ndarray  # tolerant difference, current minus normalised prior (current units)
    z: np.ndarray  # diff in noise units
    current: np.ndarray  # denoised current
    prior: np.ndarray  # denoised, normalised, registered prior
    noise: float  # sigma of the plain difference
    analysed: np.ndarray  # bool: where change was assessed


@dataclass
class RawRegion:
    mask: np.ndarray  # bool, analysis grid (cropped to `offset`)
    offset: tuple[int, ...]  # index of mask[0, 0(, 0)] in the analysis grid
    sign: int
    mean_z: float
    peak_z: float
    mean_change: float  # in units of the current image's robust intensity range
    status: str
    confidence: float


def lossy_denoise_mm(ratios: list[float | None]) -> float:
    """Smoothing for a pair with lossy-compressed images: the compression removes detail at a scale that
    grows with its ratio, and that missing detail must not read as change. An unrecorded ratio counts as 20:1."""
    known = [r if r else 20.0 for r in ratios if r is not None]
    if not known:
        return DENOISE_MM
    return float(min(LOSSY_DENOISE_MAX_MM, max(DENOISE_MM, DENOISE_MM * math.sqrt(max(known) / 10.0))))


def change_map(current: np.ndarray, prior: np.ndarray, valid: np.ndarray,
               spacing: tuple[float, ...], denoise_mm: float = DENOISE_MM) -> ChangeMap:
    from scipy import ndimage

    analysed = ndimage.binary_erosion(valid, iterations=3)  # resampling edge
    # Saturated (clipped) pixels carry no information about change.
    clipped = (current >= current.max() - 1e-3 * np.ptp(current)) | (prior >= prior[valid].max() - 1e-3 * np.ptp(prior))
    if clipped.any():
        analysed &= ~ndimage.binary_dilation(clipped, iterations=3)
    p = _normalise(current, prior, analysed)
    sigma = [max(0.6, denoise_mm / s) for s in spacing]
    if current.ndim == 3:
        sigma[0] = max(0.6, min(sigma[0], 1.0))  # slab: light smoothing across slices only
    c_s = ndimage.gaussian_filter(current, sigma)
    p_s = ndimage.gaussian_filter(p, sigma)
    plain = c_s - p_s
    noise = _mad(plain[analysed]) if analysed.any() else 1.0
    size = TOLERANCE_PX if current.ndim == 2 else 3  # volumes: +-1 voxel (a slice is 3 mm or more)
    lo = ndimage.minimum_filter(p_s, size=size)
    hi = ndimage.maximum_filter(p_s, size=size)
    diff = np.where(c_s > hi, c_s - hi, np.where(c_s < lo, c_s - lo, 0.0)).astype(np.float32)
    diff[~analysed] = 0.0
    z = diff / max(noise, 1e-6)
    return ChangeMap(diff, z.astype(np.float32), c_s, p_s, float(noise), analysed)


def _normalise(current: np.ndarray, prior: np.ndarray, mask: np.ndarray, tilt: bool = True) -> np.ndarray:
    """Map prior intensities onto the current exposure: robust tone curve, then a robust quadratic
    spatial trend of the residual. Both are fitted on a subsample; real changes are small in area
    and are rejected as outliers.

    `tilt`: the curve's slope may also vary linearly across the field. An exposure gradient (heel
    effect) applied before a nonlinear processing curve is exactly that; without it a prior with a
    strong gain/gamma difference left bands of false change near the apices (one stable history of
    the benchmark had 9 false regions). Between two people (normal references) it is off: there the
    extra freedom bends the curve onto the other person's anatomy."""
    idx = np.flatnonzero(mask.ravel())
    if idx.size < 100:
        return prior
    step = max(1, idx.size // 30_000)
    idx = idx[::step]
    c = current.ravel()[idx].astype(np.float64)
    p = prior.ravel()[idx].astype(np.float64)
    # Tone curve: piecewise linear with knots at prior quantiles (gamma and processing curves are
    # smooth and monotone but not quadratic, and the brightest structures need their own segment).
    knots = np.unique(np.quantile(p, _TONE_QUANTILES))
    if knots.size < 3:
        knots = np.array([p.min(), p.min() + 1e-6, p.max() + 2e-6])
    coords = np.unravel_index(idx, current.shape)
    grids = [(x.astype(np.float64) / n - 0.5) for x, n in zip(coords, current.shape)]
    hats = _hat_basis(p, knots)
    a_tone = np.concatenate([hats] + ([hats * g[:, None] for g in grids[-2:]] if tilt else []), 1)
    a_sp = _poly2(grids)
    # Backfitting: the exposure gradient sits inside the prior's tone curve, so fit the two in turn.
    coef_sp = np.zeros(a_sp.shape[1])
    for _ in range(4):
        coef = _robust_lstsq(a_tone, c - a_sp @ coef_sp)
        coef_sp = _robust_lstsq(a_sp, c - a_tone @ coef)
    axes = [np.arange(n, dtype=np.float64) / n - 0.5 for n in current.shape]
    mesh = np.meshgrid(*axes, indexing="ij", sparse=True)
    n = knots.size
    pf = prior.astype(np.float64)
    out = _interp_extrapolate(pf, knots, coef[:n])
    for t, g in enumerate(mesh[-2:] if tilt else []):
        out = out + g * _interp_extrapolate(pf, knots, coef[n * (t + 1):n * (t + 2)])
    out = out + sum(k * t for k, t in zip(coef_sp, _poly2(mesh, flat=False)))
    return out.astype(np.float32)


def _interp_extrapolate(x: np.ndarray, knots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """np.interp, but continuing the end segments linearly (the fit saw a subsample; clamping
    the brightest pixels to the sample maximum would invent change there)."""
    out = np.interp(x, knots, values)
    lo_slope = (values[1] - values[0]) / max(knots[1] - knots[0], 1e-12)
    hi_slope = (values[-1] - values[-2]) / max(knots[-1] - knots[-2], 1e-12)
    out = np.where(x < knots[0], values[0] + (x - knots[0]) * lo_slope, out)
    return np.where(x > knots[-1], values[-1] + (x - knots[-1]) * hi_slope, out)


def _hat_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Linear-interpolation basis: column j is the weight of knot j (np.interp with unit values)."""
    cols = []
    for j in range(knots.size):
        e = np.zeros(knots.size)
        e[j] = 1.0
        cols.append(np.interp(x, knots, e))
    return np.stack(cols, 1)


def _poly2(g, flat: bool = True):
    terms = [np.ones_like(g[0]) if flat else 1.0]
    terms += list(g)
    for i in range(len(g)):
        for j in range(i, len(g)):
            terms.append(g[i] * g[j])
    if flat:
        return np.stack([np.broadcast_to(t, g[0].shape) for t in terms], 1)
    return terms


def _robust_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    keep = np.ones(len(y), bool)
    coef = np.zeros(a.shape[1])
    for _ in range(3):
        ak = a[keep]
        # Normal equations with a whisper of ridge: ~20x faster than lstsq for these tall, thin systems.
        ata = ak.T @ ak
        coef = np.linalg.solve(ata + 1e-9 * np.trace(ata) * np.eye(a.shape[1]), ak.T @ y[keep])
        r = y - a @ coef
        keep = np.abs(r) < 3.0 * max(_mad(r[keep]), 1e-9)
    return coef


def _mad(v: np.ndarray) -> float:
    if v.size > 500_000:
        v = v[:: v.size // 500_000]
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def find_regions(cm: ChangeMap, spacing: tuple[float, ...], intensity_range: float) -> list[RawRegion]:
    from scipy import ndimage

    unit = float(np.prod(spacing))
    min_size = (MIN_VOLUME_MM3 if cm.z.ndim == 3 else MIN_AREA_MM2) / unit
    near_edge = ~ndimage.binary_erosion(cm.analysed, iterations=4)
    regions = []
    for sign in (1, -1):
        zs = cm.z * sign
        grow = zs > Z_GROW
        lab, n = ndimage.label(grow)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        peak = ndimage.maximum(zs, lab, idx)
        sizes = ndimage.sum(grow, lab, idx)
        for k, sl in enumerate(ndimage.find_objects(lab)):
            if peak[k] < (Z_SEED_3D if cm.z.ndim == 3 else Z_SEED) or sizes[k] < min_size:
                continue
            m = lab[sl] == (k + 1)
            if m.ndim == 3:
                # Volumes: a solid lesion's edge is its half-maximum (partial volume and smoothing
                # spread a high-contrast CT nodule well beyond it at a noise-based threshold).
                m &= zs[sl] >= 0.5 * float(np.percentile(zs[sl][m], 95))
                m = _largest_component(m)
            zvals = zs[sl][m]
            if zvals.mean() < _required_mean_z(m.sum() * unit, m.ndim) or m.sum() < min_size:
                continue
            if near_edge[sl][m].mean() > 0.3:
                continue  # hugging the edge of the registered field: resampling, not anatomy
            if not _compact_enough(m, spacing):
                continue  # a long thin band along an edge: residual misregistration, not a lesion
            mean_change = float(cm.diff[sl][m].mean() / max(intensity_range, 1e-6))
            status, conf = _status(cm, sl, m, sign, zvals)
            if _DEBUG:
                print("region", sign, sl, float(zvals.mean()), float(peak[k]), int(sizes[k] * unit))
            regions.append(RawRegion(m, tuple(s.start for s in sl), sign, float(zvals.mean()),
                                     float(peak[k]), mean_change, status, conf))
    return regions


def _required_mean_z(size: float, ndim: int) -> float:
    """Large faint regions are what residual exposure/processing differences look like; a real
    change that large is a substantial density change. So the bar rises with extent."""
    ref = 250.0 if ndim == 2 else 1000.0  # mm2 / mm3
    return MIN_MEAN_Z + 1.5 * max(0.0, math.log2(size / ref))


def _largest_component(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(m)
    if n <= 1:
        return m
    return lab == (1 + int(np.argmax(ndimage.sum(m, lab, range(1, n + 1)))))


def _compact_enough(m: np.ndarray, spacing: tuple[float, ...]) -> bool:
    """Lesions are blobs (or, for effusions, thick crescents); edge artefacts are thin bands whose
    thickness is a small fraction of their length."""
    from scipy import ndimage

    inradius = float(ndimage.distance_transform_edt(np.pad(m, 1), sampling=spacing).max())
    extent = max((n * s for n, s in zip(m.shape, spacing)))
    return inradius >= MIN_INRADIUS_MM and inradius >= THICKNESS_RATIO * extent


def _status(cm: ChangeMap, sl, m: np.ndarray, sign: int, zvals: np.ndarray) -> tuple[str, float]:
    """new/worsened for increases, resolved/improved for decreases (see module doc).

    Judged from the profile of the change itself, which is free of anatomy (ribs and vessels are
    in both images and cancel): a lesion that appeared or vanished changes most at its centre,
    while one that grew or shrank leaves its smaller self in the middle, so the change is weaker
    in the core than in the annulus around it (for spheres, core/annulus ~0.6-0.75 against ~1.2)."""
    from scipy import ndimage

    # The profile is read on the plain difference: the tolerant one has eaten the region's rim.
    grow = TOLERANCE_PX
    origin = tuple(s.start for s in sl)
    sl = tuple(slice(max(0, s.start - grow), min(n, s.stop + grow)) for s, n in zip(sl, cm.z.shape))
    seed = np.zeros([s.stop - s.start for s in sl], bool)
    seed[tuple(slice(o - s.start, o - s.start + k) for o, s, k in zip(origin, sl, m.shape))] = m
    plain = (cm.current[sl] - cm.prior[sl]) * sign / max(cm.noise, 1e-6) > Z_GROW
    lab, _ = ndimage.label(plain | seed)
    # Filled: a solid lesion that grew in a volume changes only in a shell around its old self.
    m = ndimage.binary_fill_holes(np.isin(lab, np.unique(lab[seed]))) & cm.analysed[sl]
    dist = ndimage.distance_transform_edt(np.pad(m, 1))[tuple(slice(1, -1) for _ in m.shape)]
    top = float(dist.max())
    if top < 2.0:
        return "indeterminate", 0.3  # too thin to have a core
    delta = (cm.current[sl] - cm.prior[sl]) * sign
    if m.ndim == 3:
        return _status_volume(cm, sl, m, sign, delta, zvals)
    core = dist >= 0.6 * top
    annulus = (dist >= 0.2 * top) & ~core
    if not annulus.any() or not core.any():
        return "indeterminate", 0.3
    ratio = float(delta[core].mean()) / max(float(delta[annulus].mean()), 1e-6)
    present = ratio < PROFILE_RATIO  # the lesion is (still or already) there at the other time point
    if _DEBUG:
        print("status", sign, round(ratio, 3))
    if sign > 0:
        status = "worsened" if present else "new"
    else:
        status = "improved" if present else "resolved"
    strength = 1.0 - math.exp(-(float(zvals.mean()) - Z_GROW) / 4.0)
    margin = min(1.0, abs(ratio - PROFILE_RATIO) / 0.2)  # near the threshold the status is less sure
    return status, round(float(np.clip(strength * (0.6 + 0.4 * margin), 0.05, 0.99)), 3)


def _status_volume(cm: ChangeMap, sl, m: np.ndarray, sign: int, delta: np.ndarray,
                   zvals: np.ndarray) -> tuple[str, float]:
    """Volumes have no superimposed anatomy and calibrated units, so the other time point is read
    directly: is there lesion density in the region's core, against the tissue around it?"""
    from scipy import ndimage

    core = ndimage.binary_erosion(m, iterations=1)
    if not core.any():
        core = m
    ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m, iterations=1)
    ring &= cm.analysed[sl]
    change = float(delta[core].mean())
    if ring.sum() < 8 or change <= 0:
        return "indeterminate", 0.3
    other = cm.prior[sl] if sign > 0 else cm.current[sl]
    present_ratio = (float(other[core].mean()) - float(np.median(other[ring]))) / change
    if _DEBUG:
        print("status3d", sign, round(present_ratio, 3))
    present = present_ratio > VOLUME_PRESENT_RATIO
    status = ("worsened" if present else "new") if sign > 0 else ("improved" if present else "resolved")
    strength = 1.0 - math.exp(-(float(zvals.mean()) - Z_GROW) / 4.0)
    margin = min(1.0, abs(present_ratio - VOLUME_PRESENT_RATIO) / 0.2)
    return status, round(float(np.clip(strength * (0.6 + 0.4 * margin), 0.05, 0.99)), 3)


def contour_2d(mask: np.ndarray) -> list[tuple[int, int]]:
    """Outer boundary of a 2D mask, traced clockwise (Moore neighbour), as (row, col) points."""
    padded = np.pad(mask, 1)
    rows, cols = np.nonzero(padded)
    if rows.size == 0:
        return []
    start = (int(rows[0]), int(cols[0]))  # top-most, then left-most pixel
    nbrs = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]
    out = [start]
    cur, back = start, 6  # we entered start from its west
    for _ in range(4 * mask.size + 8):
        for i in range(8):
            d = (back + 1 + i) % 8
            nr, nc = cur[0] + nbrs[d][0], cur[1] + nbrs[d][1]
            if padded[nr, nc]:
                back = (d + 4) % 8
                cur = (nr, nc)
                break
        else:
            break  # single isolated pixel
        if cur == start:
            break
        out.append(cur)
    return [(r - 1, c - 1) for r, c in out]


def longest_diameter_mm(points: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Largest distance between two boundary points, in mm (convex hull keeps it cheap)."""
    pts = points.astype(np.float64) * np.asarray(spacing, float)
    if len(pts) < 2:
        return float(max(spacing))
    if len(pts) > 3 + pts.shape[1]:
        try:
            from scipy.spatial import ConvexHull

            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # degenerate (collinear) sets: use them all
            pass
    if len(pts) > 3000:
        pts = pts[np.linspace(0, len(pts) - 1, 3000).astype(int)]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
    return float(d + max(spacing))  # pixel centres to pixel edges
