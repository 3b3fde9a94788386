"""Synthetic longitudinal data with ground truth: chest radiograph pairs and small CT volume pairs.

Written as proper DICOM (deterministic real UIDs derived from the seed, patient /
study / series attributes, pixel spacing, view) so the same pairs serve unit
tests, the quickstart archive and the accuracy benchmark.

Chest radiographs are rendered in a log-attenuation domain (higher = denser):
body, lungs with a parenchymal texture, diaphragm domes, heart, mediastinum,
spine, posterior ribs and clavicles. The current image is the reference frame;
the prior is the same anatomy seen with a repositioning (shift, rotation,
scale), its own exposure (gain, offset, gamma, heel gradient) and its own
noise. Lesions are added per time point, so the truth is known exactly in
current-image pixel coordinates.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import date
from typing import NamedTuple

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CHEST_CHANGES = (
    "new_nodule", "growing_nodule", "shrinking_nodule", "resolved_nodule",
    "new_effusion", "resolved_effusion", "new_consolidation", "resolved_consolidation", "stable",
)
CT_CHANGES = ("new_nodule", "growing_nodule", "shrinking_nodule", "stable")
EXPECTED_STATUS = {
    "new_nodule": "new", "growing_nodule": "worsened", "shrinking_nodule": "improved",
    "resolved_nodule": "resolved", "new_effusion": "new", "resolved_effusion": "resolved",
    "new_consolidation": "new", "resolved_consolidation": "resolved", "stable": "stable",
}
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
FOV_MM = 430.0
_CANVAS_MAX = 1024  # anatomy is rendered at most this fine, then resampled (keeps 2048 generation fast)
_ZONES = ("upper", "middle", "lower")


@dataclass(frozen=True)
class TruthRegion:
    kind: str  # nodule / effusion / consolidation
    status: str  # expected change status
    zone: str  # e.g. "right lower zone"
    bbox: tuple[int, ...]  # current-image pixels, end-exclusive; (r0,c0,r1,c1) or (z0,r0,c0,z1,r1,c1)
    size_mm: float  # longest diameter of the changed area
    center: tuple[float, ...]  # current-image pixel coordinates
    # Longest diameter of the lesion itself at each visit, oldest first (None: absent then); nodules only.
    sizes_mm: tuple[float | None, ...] = ()


@dataclass
class PhantomTruth:
    change: str
    regions: list[TruthRegion] = field(default_factory=list)
    prior_to_current: dict = field(default_factory=dict)  # the repositioning applied to the prior
    notes: dict = field(default_factory=dict)


class Pair(NamedTuple):
    current: object  # Dataset for radiographs; list[Dataset] (slices) for CT
    prior: object
    truth: PhantomTruth


@dataclass(frozen=True)
class PatientInfo:
    patient_id: str = "PHANTOM001"
    patient_name: str = "Phantom^Chest"
    birth_date: str = "19600101"
    sex: str = "O"
    current_date: date = date(2024, 6, 1)
    prior_date: date = date(2023, 6, 1)
    current_accession: str = "ACC0002"
    prior_accession: str = "ACC0001"


# ----------------------------------------------------------------------------- chest radiograph


def make_chest_pair(seed: int, change: str = "new_nodule", size: int = 512, *,
                    patient: PatientInfo | None = None, reposition: bool = True,
                    exposure_jitter: bool = True, monochrome1: bool = False,
                    lesion_size_mm: float | None = None, view: str = "PA") -> Pair:
    """A (current, prior, truth) chest radiograph pair. `change` is one of CHEST_CHANGES."""
    if change not in CHEST_CHANGES:
        raise ValueError(f"change must be one of {CHEST_CHANGES}, not {change!r}")
    patient = patient or PatientInfo()
    rng = np.random.default_rng(seed)
    canvas = min(size, _CANVAS_MAX)
    anatomy_rng = np.random.default_rng(_stable_int(patient.patient_id, seed))
    geo = _chest_geometry(anatomy_rng)
    base = _render_chest(canvas, geo, anatomy_rng)
    cur_lesion = np.zeros_like(base)
    pri_lesion = np.zeros_like(base)
    truth = PhantomTruth(change=change)
    spacing_out = FOV_MM / size
    scale_c2o = size / canvas

    def add_truth(kind: str, mask_or_disk, zone: str, size_mm: float, center_c, sizes=()) -> None:
        if isinstance(mask_or_disk, np.ndarray):
            rr, cc = np.nonzero(mask_or_disk)
            bbox_c = (rr.min(), cc.min(), rr.max() + 1, cc.max() + 1)
        else:
            (r, c), rad = center_c, mask_or_disk
            bbox_c = (r - rad, c - rad, r + rad + 1, c + rad + 1)
        bbox = tuple(int(round(v * scale_c2o)) for v in bbox_c)
        truth.regions.append(TruthRegion(kind, EXPECTED_STATUS[change], zone, bbox, float(size_mm),
                                         (center_c[0] * scale_c2o, center_c[1] * scale_c2o), tuple(sizes)))

    cmm = FOV_MM / canvas
    if change.endswith("nodule") or change == "stable":
        side, zone_i, (r, c) = _pick_lung_spot(rng, geo, canvas)
        zone = _zone_name(side, zone_i)
        # Growth/shrinkage is only well defined for measurable lesions (>= 10 mm, as in RECIST).
        lo = 8.0 if change in ("new_nodule", "resolved_nodule", "stable") else 12.0
        d = lesion_size_mm or float(rng.uniform(lo, 30.0))
        if change == "new_nodule":
            _add_nodule(cur_lesion, r, c, d / 2 / cmm)
            add_truth("nodule", d / 2 / cmm, zone, d, (r, c), (None, d))
        elif change == "resolved_nodule":
            _add_nodule(pri_lesion, r, c, d / 2 / cmm)
            add_truth("nodule", d / 2 / cmm, zone, d, (r, c), (d, None))
        elif change == "growing_nodule":
            d0 = d / rng.uniform(1.4, 1.8)
            _add_nodule(pri_lesion, r, c, d0 / 2 / cmm)
            _add_nodule(cur_lesion, r, c, d / 2 / cmm)
            add_truth("nodule", d / 2 / cmm, zone, d, (r, c), (d0, d))
        elif change == "shrinking_nodule":
            d1 = d * rng.uniform(0.5, 0.7)
            _add_nodule(pri_lesion, r, c, d / 2 / cmm)
            _add_nodule(cur_lesion, r, c, d1 / 2 / cmm)
            add_truth("nodule", d / 2 / cmm, zone, d, (r, c), (d, d1))
        else:  # stable: an unchanged nodule in both, which must not be reported
            _add_nodule(pri_lesion, r, c, d / 2 / cmm)
            _add_nodule(cur_lesion, r, c, d / 2 / cmm)
            truth.notes["stable_nodule"] = {"center": (r * scale_c2o, c * scale_c2o), "diameter_mm": d}
    elif change.endswith("effusion"):
        side = int(rng.choice([-1, 1]))
        lesion = _effusion(canvas, geo, side, rng.uniform(25.0, 55.0) / FOV_MM)
        target = cur_lesion if change == "new_effusion" else pri_lesion
        target += lesion
        mask = lesion > 0.15 * lesion.max()
        add_truth("effusion", mask, _zone_name(side, 2), _extent_mm(mask, cmm), _centroid(mask))
    else:  # consolidation
        side, zone_i, (r, c) = _pick_lung_spot(rng, geo, canvas)
        lesion = _consolidation(canvas, geo, side, r, c, rng.uniform(25.0, 55.0) / cmm, rng)
        target = cur_lesion if change == "new_consolidation" else pri_lesion
        target += lesion
        mask = lesion > 0.15 * lesion.max()
        add_truth("consolidation", mask, _zone_name(side, zone_i), _extent_mm(mask, cmm), _centroid(mask))

    # Repositioning of the prior, as a map from prior output pixels to current output pixels.
    if reposition:
        angle = float(rng.uniform(-4.0, 4.0))
        scale = float(rng.uniform(0.95, 1.05))
        shift = rng.uniform(-12.0, 12.0, size=2) / spacing_out
    else:
        angle, scale, shift = 0.0, 1.0, np.zeros(2)
    truth.prior_to_current = {"angle_deg": angle, "scale": scale, "shift_px": tuple(float(s) for s in shift)}

    # The current is resampled too (by a sub-pixel offset), so that both images carry the same
    # interpolation blur, as two real exposures share the detector's sampling.
    jitter_px = rng.uniform(0.3, 0.7, size=2) * (1 if reposition else 0)
    cur = _expose(_resample(base + cur_lesion, size, 0.0, 1.0, jitter_px), rng, exposure_jitter, spacing_out)
    pri = _expose(_resample(base + pri_lesion, size, angle, scale, shift), rng, exposure_jitter, spacing_out)
    uid_root = f"{patient.patient_id}|{seed}|{change}|{size}|{view}|{patient.current_accession}|{patient.prior_accession}"
    cur_ds = _dx_dataset(cur, spacing_out, patient, patient.current_date, patient.current_accession,
                         f"{uid_root}|current", view, monochrome1)
    pri_ds = _dx_dataset(pri, spacing_out, patient, patient.prior_date, patient.prior_accession,
                         f"{uid_root}|prior", view, monochrome1)
    return Pair(cur_ds, pri_ds, truth)


HISTORY_TRAJECTORIES = ("growing", "shrinking", "new", "resolved", "stable")
TREND_OF = {"growing": "worsened", "shrinking": "improved", "new": "new", "resolved": "resolved", "stable": "stable"}
# Differences between visits that a real archive holds (the prior side of each pair); "standard" is
# repositioning, exposure and noise alone.
PERTURBATIONS = ("standard", "strong_exposure", "inspiration", "detector", "monochrome1", "lossy", "two_changes",
                 "small_nodule")


class History(NamedTuple):
    visits: list  # Datasets, oldest first; the last is the current study
    truth: PhantomTruth


def make_chest_history(seed: int, trajectory: str = "growing", visits: int = 3, size: int = 512, *,
                       perturbation: str = "standard", patient: PatientInfo | None = None,
                       lesion_size_mm: float | None = None) -> History:
    """A patient's chest PA studies over `visits` years, one nodule following `trajectory`. The truth
    gives the nodule's diameter at each visit (`TruthRegion.sizes_mm`, None where absent), in the
    current (last) image's pixels; `perturbation` changes how the priors were acquired or stored."""
    if trajectory not in HISTORY_TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {HISTORY_TRAJECTORIES}, not {trajectory!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, not {perturbation!r}")
    if visits < 2:
        raise ValueError("a history needs at least 2 visits")
    patient = patient or PatientInfo()
    rng = np.random.default_rng(_stable_int("history", seed, trajectory, visits, perturbation))
    canvas = min(size, _CANVAS_MAX)
    geo = _chest_geometry(np.random.default_rng(_stable_int(patient.patient_id, seed)))
    base = _render_chest(canvas, geo, np.random.default_rng(_stable_int(patient.patient_id, seed)))
    cmm = FOV_MM / canvas
    side, zone_i, (r, c) = _pick_lung_spot(rng, geo, canvas)
    small = perturbation == "small_nodule"
    d = lesion_size_mm or float(rng.uniform(6.0, 9.0) if small else rng.uniform(12.0, 24.0))
    step = float(rng.uniform(1.3, 1.5) if visits > 2 else rng.uniform(1.4, 1.8))
    n = visits
    sizes: list[float | None] = {
        "growing": [d / step ** (n - 1 - i) for i in range(n)],  # d at the current visit
        "shrinking": [d / step ** i for i in range(n)],  # d at the first visit
        "new": [None] * (n - 1) + [d],
        "resolved": [d] * (n - 1) + [None],
        "stable": [d] * n,
    }[trajectory]
    truth = PhantomTruth(change=trajectory)
    scale_c2o = size / canvas
    others = []
    if perturbation == "two_changes":  # a second, new nodule elsewhere at the last visit
        for _ in range(50):
            s2, z2, (r2, c2) = _pick_lung_spot(rng, geo, canvas)
            if math.hypot(r2 - r, c2 - c) * cmm > 60:
                others.append((s2, z2, r2, c2, float(rng.uniform(10.0, 20.0))))
                break
    if trajectory != "stable":
        big = max(v for v in sizes if v)
        rad = big / 2 / cmm
        bbox = tuple(int(round(v * scale_c2o)) for v in (r - rad, c - rad, r + rad + 1, c + rad + 1))
        truth.regions.append(TruthRegion("nodule", TREND_OF[trajectory], _zone_name(side, zone_i), bbox, big,
                                         (r * scale_c2o, c * scale_c2o), tuple(sizes)))
    else:
        truth.notes["stable_nodule"] = {"center": (r * scale_c2o, c * scale_c2o), "diameter_mm": d}
    for s2, z2, r2, c2, d2 in others:
        rad = d2 / 2 / cmm
        bbox = tuple(int(round(v * scale_c2o)) for v in (r2 - rad, c2 - rad, r2 + rad + 1, c2 + rad + 1))
        truth.regions.append(TruthRegion("nodule", "new", _zone_name(s2, z2), bbox, d2, (r2 * scale_c2o, c2 * scale_c2o),
                                         tuple([None] * (n - 1) + [d2])))
    datasets = []
    for i in range(n):
        current = i == n - 1
        lesion = np.zeros_like(base)
        if sizes[i]:
            _add_nodule(lesion, r, c, sizes[i] / 2 / cmm)
        if current:
            for _, _, r2, c2, d2 in others:
                _add_nodule(lesion, r2, c2, d2 / 2 / cmm)
        out_size = size if current or perturbation != "detector" else int(round(size * 0.8 / 8)) * 8
        spacing = FOV_MM / out_size
        if current:
            angle, scale, shift, rows = 0.0, 1.0, rng.uniform(0.3, 0.7, size=2), 1.0
        else:
            angle, scale = float(rng.uniform(-4.0, 4.0)), float(rng.uniform(0.95, 1.05))
            shift = rng.uniform(-12.0, 12.0, size=2) / spacing
            rows = float(rng.uniform(1.03, 1.07)) if perturbation == "inspiration" else 1.0
        img = _resample(base + lesion, out_size, angle, scale, shift, rows)
        strong = perturbation == "strong_exposure" and not current
        stored = _expose(img, rng, True, spacing, strong=strong)
        when = date.fromordinal(patient.current_date.toordinal() - 365 * (n - 1 - i))
        accession = f"{patient.current_accession}-{i}" if not current else patient.current_accession
        root = f"{patient.patient_id}|history|{seed}|{trajectory}|{n}|{perturbation}|{size}|{i}"
        ds = _dx_dataset(stored, spacing, patient, when, accession, root, "PA",
                         perturbation == "monochrome1" and not current)
        if perturbation == "lossy" and i == n - 2:
            _lossy(ds, 40)
        datasets.append(ds)
    return History(datasets, truth)


def _lossy(ds: Dataset, ratio: float) -> None:
    """Store as lossy JPEG 2000 at about `ratio`:1, flagged as DICOM requires."""
    from pydicom.uid import JPEG2000

    ds.compress(JPEG2000, ds.pixel_array, encoding_plugin="pylibjpeg", j2k_cr=[ratio])
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{ratio:g}"
    ds.LossyImageCompressionMethod = "ISO_15444_1"


@dataclass(frozen=True)
class _Geo:
    lungs: dict  # side -> (cu, cv, au, av, dome_v)
    heart: tuple[float, float, float, float]


def _chest_geometry(rng: np.random.Generator) -> _Geo:
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731 - tiny helper for anatomic variation
    lungs = {
        -1: (-0.40 + j(0.02), 0.45 + j(0.02), 0.28 + j(0.02), 0.36 + j(0.02), 0.72 + j(0.02)),
        1: (0.40 + j(0.02), 0.46 + j(0.02), 0.26 + j(0.02), 0.35 + j(0.02), 0.75 + j(0.02)),
    }
    heart = (0.10 + j(0.02), 0.63 + j(0.02), 0.24 + j(0.02), 0.15 + j(0.01))
    return _Geo(lungs, heart)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(n, dtype=np.float32) + 0.5) / n
    return ax[None, :] * 2 - 1, ax[:, None]  # u in [-1, 1] across, v in [0, 1] down


def _lung_depth(u, v, lung) -> np.ndarray:
    cu, cv, au, av, dome = lung
    e = ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2
    dome_v = dome - 0.07 * np.clip(1 - ((u - cu) / au) ** 2, 0, 1)
    below = np.clip((dome_v - v) / 0.02, 0, 1)  # sharp diaphragm edge
    return np.sqrt(np.clip(1 - e, 0, 1)) * below


def _render_chest(n: int, geo: _Geo, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    u, v = _grid(n)
    body = 0.55 * np.sqrt(np.clip(1 - (u / 0.86) ** 2 - ((v - 0.58) / 0.62) ** 2, 0, 1))
    a = body.astype(np.float32)
    lungs = np.zeros((n, n), np.float32)
    for lung in geo.lungs.values():
        lungs = np.maximum(lungs, _lung_depth(u, v, lung))
    # Parenchymal texture (vessels, interstitium): smooth noise, part of anatomy so identical in both.
    tex = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), sigma=max(1.0, n / 300))
    tex /= tex.std() + 1e-6
    a -= lungs * (0.30 - 0.012 * tex)
    hu, hv, ha, hb = geo.heart
    a += 0.22 * np.sqrt(np.clip(1 - ((u - hu) / ha) ** 2 - ((v - hv) / hb) ** 2, 0, 1))
    top_bottom = np.clip((v - 0.02) / 0.03, 0, 1) * np.clip((0.66 - v) / 0.05, 0, 1)
    a += 0.18 * np.sqrt(np.clip(1 - (u / 0.09) ** 2, 0, 1)) * top_bottom
    spine = np.sqrt(np.clip(1 - (u / 0.055) ** 2, 0, 1))
    a += spine * (0.16 + 0.03 * np.cos(2 * np.pi * v / 0.045))
    inside = body > 0.05
    for s in (-1, 1):
        w = s * u - 0.06
        on_side = (w > 0) & (w < 0.74)
        for k in range(10):
            vk = 0.15 + 0.057 * k + float(rng.uniform(-0.004, 0.004))
            vc = vk + 0.35 * w * w - 0.04 * w
            b = np.clip(1 - ((v - vc) / 0.016) ** 2, 0, 1)
            a += 0.06 * np.sqrt(b) * on_side * inside
        # clavicle: a straight bar from the sternal end to the shoulder
        vcl = 0.12 - 0.07 * np.clip(w / 0.45, 0, 1)
        taper = np.clip((w + 0.02) / 0.03, 0, 1) * np.clip((0.47 - w) / 0.06, 0, 1)  # bones taper
        bcl = np.sqrt(np.clip(1 - ((v - vcl) / 0.016) ** 2, 0, 1)) * taper
        a += 0.10 * bcl
    # Detector unsharpness (~0.5 mm): real radiographs are band-limited, no feature is a step.
    return ndimage.gaussian_filter(a, sigma=0.5 / (FOV_MM / n))


def _pick_lung_spot(rng, geo: _Geo, n: int) -> tuple[int, int, tuple[float, float]]:
    """A lesion centre well inside one lung, away from zone borders and the heart."""
    u, v = _grid(n)
    for _ in range(200):
        side = int(rng.choice([-1, 1]))
        zone_i = int(rng.integers(0, 3))
        cu, cv, au, av, dome = geo.lungs[side]
        top, bottom = cv - av, dome - 0.0  # lung vertical span (apex to costophrenic angle)
        frac = (zone_i + 0.5 + rng.uniform(-0.25, 0.25)) / 3
        vv = top + frac * (bottom - top)
        uu = cu + side * rng.uniform(-0.45, 0.45) * au
        r, c = vv * n, (uu + 1) / 2 * n
        ri, ci = int(r), int(c)
        if not (0 <= ri < n and 0 <= ci < n):
            continue
        depth = _lung_depth(u[:, ci:ci + 1], v[ri:ri + 1, :], geo.lungs[side])[0, 0]
        hu, hv, ha, hb = geo.heart
        in_heart = ((uu - hu) / ha) ** 2 + ((vv - hv) / hb) ** 2 < 1.3
        if depth > 0.55 and not in_heart:
            return side, zone_i, (r, c)
    raise RuntimeError("could not place a lesion")


def _zone_name(side: int, zone_i: int) -> str:
    # PA display: image left (side -1) is the patient's right.
    return f"{'right' if side < 0 else 'left'} {_ZONES[zone_i]} zone"


def _add_nodule(img: np.ndarray, r: float, c: float, radius_px: float) -> None:
    """A sphere's projection: density proportional to the chord length through it."""
    n = img.shape[0]
    rad = radius_px + 2
    r0, r1 = max(0, int(r - rad)), min(n, int(r + rad) + 2)
    c0, c1 = max(0, int(c - rad)), min(n, int(c + rad) + 2)
    rr, cc = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    d2 = ((rr + 0.5 - r) ** 2 + (cc + 0.5 - c) ** 2) / radius_px**2
    mm_per_px = FOV_MM / n
    img[r0:r1, c0:c1] += 0.0045 * 2 * radius_px * mm_per_px * np.sqrt(np.clip(1 - d2, 0, 1))


def _effusion(n: int, geo: _Geo, side: int, height: float) -> np.ndarray:
    """Fluid in the costophrenic recess: fills the lung base up to a meniscus higher laterally."""
    u, v = _grid(n)
    lung = geo.lungs[side]
    cu, cv, au, av, dome = lung
    depth_mask = np.clip(_lung_depth(u, v, lung) * 6, 0, 1)
    lateral = np.clip(side * (u - cu) / au, -1, 1)  # -1 medial .. 1 lateral
    dome_v = dome - 0.07 * np.clip(1 - ((u - cu) / au) ** 2, 0, 1)
    level = dome_v - height * (0.7 + 0.5 * lateral)
    fill = np.clip((v - level) / 0.015, 0, 1)
    return (0.16 * fill * depth_mask).astype(np.float32)


def _consolidation(n, geo, side, r, c, diameter_px, rng) -> np.ndarray:
    """Patchy airspace opacity: a few overlapping blobs, smoothed, confined to the lung."""
    from scipy import ndimage

    u, v = _grid(n)
    rr, cc = np.mgrid[0:n, 0:n].astype(np.float32)
    blob = np.zeros((n, n), np.float32)
    for _ in range(4):
        dr, dc = rng.normal(0, diameter_px * 0.15, size=2)
        rad = diameter_px * rng.uniform(0.25, 0.4)
        blob = np.maximum(blob, 1 - (((rr - r - dr) ** 2 + (cc - c - dc) ** 2) / rad**2))
    blob = ndimage.gaussian_filter(np.clip(blob, 0, 1) ** 0.5, sigma=max(1.0, diameter_px / 15))
    depth_mask = np.clip(_lung_depth(u, v, geo.lungs[side]) * 3, 0, 1)
    return (0.10 * blob * depth_mask).astype(np.float32)


def _extent_mm(mask: np.ndarray, mm: float) -> float:
    rr, cc = np.nonzero(mask)
    pts = np.stack([rr, cc], 1)
    if len(pts) > 4000:
        pts = pts[np.linspace(0, len(pts) - 1, 4000).astype(int)]
    from scipy.spatial import ConvexHull

    hull = pts[ConvexHull(pts).vertices]
    d = np.sqrt(((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1)).max()
    return float(d * mm)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rr, cc = np.nonzero(mask)
    return float(rr.mean()), float(cc.mean())


def _resample(canvas_img: np.ndarray, size: int, angle_deg: float, scale: float, shift_px,
              rows: float = 1.0) -> np.ndarray:
    """Render an output image of `size` px; output pixel o shows the anatomy at current pixel
    R*S*(o - centre) + centre + shift, read from the canvas."""
    from scipy import ndimage

    n = canvas_img.shape[0]
    k = n / size
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) * scale
    rot = np.diag([1.0 / rows, 1.0]) @ rot  # rows > 1: the anatomy taller (a deeper inspiration)
    centre = np.array([size / 2 - 0.5, size / 2 - 0.5])
    # canvas = k * (p + 0.5) - 0.5 with p = rot @ (o - centre) + centre + shift
    matrix = k * rot
    offset = k * (-rot @ centre + centre + np.asarray(shift_px, float) + 0.5) - 0.5
    return ndimage.affine_transform(canvas_img, matrix, offset=offset, output_shape=(size, size),
                                    order=1, mode="constant", cval=0.0).astype(np.float32)


def _expose(a: np.ndarray, rng, jitter: bool, spacing_mm: float, strong: bool = False) -> np.ndarray:
    """Log-attenuation to 12-bit detector values with this exposure's gain, gamma, heel effect, noise."""
    gain = rng.uniform(0.85, 1.15) if jitter else 1.0
    offset = 300 + (rng.uniform(-100, 100) if jitter else 0.0)
    gamma = rng.uniform(0.88, 1.12) if jitter else 1.0
    if strong:  # another detector or processing: larger gain and gamma differences
        gain, gamma = rng.choice([0.7, 1.3]) * rng.uniform(0.95, 1.05), rng.choice([0.8, 1.25])
    heel = rng.uniform(-0.06, 0.06) if jitter else 0.0
    noise = (rng.uniform(0.8, 1.3) if jitter else 1.0) * 25.0 * min(1.0, 0.2 / spacing_mm)
    n = a.shape[0]
    # Heel effect: an exposure gradient, i.e. an additive ramp in this log domain.
    ramp = heel * 2400.0 * ((np.arange(n, dtype=np.float32) / n) - 0.5)[:, None]
    img = offset + gain * 2400.0 * np.clip(a, 0, None) ** gamma + ramp
    img += rng.standard_normal(a.shape, dtype=np.float32) * noise
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


# ----------------------------------------------------------------------------- CT volumes


def make_ct_pair(seed: int, change: str = "new_nodule", shape: tuple[int, int, int] = (48, 160, 160),
                 spacing_mm: tuple[float, float, float] = (3.0, 2.0, 2.0), *,
                 patient: PatientInfo | None = None, reposition: bool = True,
                 lesion_size_mm: float | None = None) -> Pair:
    """A (current slices, prior slices, truth) chest CT pair; slices are CT Image Storage datasets."""
    if change not in CT_CHANGES:
        raise ValueError(f"change must be one of {CT_CHANGES}, not {change!r}")
    patient = patient or PatientInfo(patient_name="Phantom^CT")
    rng = np.random.default_rng(seed)
    anat_rng = np.random.default_rng(_stable_int(patient.patient_id, seed, "ct"))
    vessels = [(anat_rng.uniform(-0.9, 0.9), anat_rng.uniform(-0.5, 0.5), anat_rng.uniform(-0.8, 0.8),
                anat_rng.uniform(1.5, 3.0)) for _ in range(40)]
    nz, ny, nx = shape
    dz, dy, dx = spacing_mm
    ext = np.array([nz * dz, ny * dy, nx * dx])
    # Nodule centre in the right or left lung, in mm relative to the volume centre.
    side = int(rng.choice([-1, 1]))
    centre = np.array([rng.uniform(-0.25, 0.25) * ext[0], rng.uniform(-0.12, 0.12) * ext[1],
                       side * rng.uniform(0.2, 0.32) * ext[2]])
    d = lesion_size_mm or float(rng.uniform(8.0 if change in ("new_nodule", "stable") else 12.0, 20.0))
    d_prior, d_cur = {"new_nodule": (0.0, d), "growing_nodule": (d / rng.uniform(1.4, 1.8), d),
                      "shrinking_nodule": (d, d * rng.uniform(0.5, 0.7)), "stable": (d, d)}[change]
    if reposition:
        angle = float(rng.uniform(-3, 3))
        shift = rng.uniform(-6, 6, size=3) * np.array([0.5, 1, 1])
    else:
        angle, shift = 0.0, np.zeros(3)

    cur = _render_ct(shape, spacing_mm, 0.0, np.zeros(3), vessels, centre, d_cur, rng)
    pri = _render_ct(shape, spacing_mm, angle, shift, vessels, centre, d_prior, rng)
    truth = PhantomTruth(change=change, prior_to_current={"angle_deg": angle, "shift_mm": tuple(shift)})
    if change != "stable":
        size = max(d_prior, d_cur)
        cz, cy, cx = centre / np.array(spacing_mm) + np.array(shape) / 2 - 0.5
        rad = size / 2 / np.array(spacing_mm)
        bbox = tuple(int(round(x)) for x in (cz - rad[0], cy - rad[1], cx - rad[2],
                                               cz + rad[0] + 1, cy + rad[1] + 1, cx + rad[2] + 1))
        zone = f"{'right' if side < 0 else 'left'} lung"
        truth.regions.append(TruthRegion("nodule", EXPECTED_STATUS[change], zone, bbox, size, (cz, cy, cx)))
    root = f"{patient.patient_id}|{seed}|ct|{change}|{patient.current_accession}|{patient.prior_accession}"
    return Pair(_ct_datasets(cur, spacing_mm, patient, patient.current_date, patient.current_accession, f"{root}|c"),
                _ct_datasets(pri, spacing_mm, patient, patient.prior_date, patient.prior_accession, f"{root}|p"),
                truth)


def _render_ct(shape, spacing, angle_deg, shift_mm, vessels, nod_centre, nod_d, rng) -> np.ndarray:
    """HU volume; voxel positions are mapped into the anatomy frame (rotation about z, shift)."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    t = math.radians(angle_deg)
    ya = math.cos(t) * y - math.sin(t) * x + shift_mm[1]
    xa = math.sin(t) * y + math.cos(t) * x + shift_mm[2]
    za = z + shift_mm[0]
    half = np.array(shape) * np.array(spacing) / 2
    hu = np.full(shape, -1000.0, np.float32)
    body = (xa / (half[2] * 0.92)) ** 2 + (ya / (half[1] * 0.7)) ** 2
    hu[body < 1] = -100.0  # fat rim
    hu[body < 0.85] = 40.0
    for s in (-1, 1):
        lung = (((xa - s * half[2] * 0.42) / (half[2] * 0.3)) ** 2 + (ya / (half[1] * 0.5)) ** 2
                + ((za + half[0] * 0.1) / (half[0] * 1.3)) ** 2)
        hu[lung < 1] = -850.0
    heart = ((xa - half[2] * 0.08) / (half[2] * 0.22)) ** 2 + ((ya + half[1] * 0.15) / (half[1] * 0.3)) ** 2 \
        + ((za + half[0] * 0.5) / (half[0] * 0.6)) ** 2
    hu[heart < 1] = 40.0
    spine = (xa / (half[2] * 0.08)) ** 2 + ((ya - half[1] * 0.5) / (half[1] * 0.12)) ** 2
    hu[spine < 1] = 600.0
    for vx, vy, vz, r in vessels:
        dd = (xa - vx * half[2] * 0.55) ** 2 + (ya - vy * half[1]) ** 2 + (za - vz * half[0]) ** 2
        hu = np.where((dd < r * r) & (hu < -500), 30.0, hu)
    if nod_d > 0:
        dist = np.sqrt((za - nod_centre[0]) ** 2 + (ya - nod_centre[1]) ** 2 + (xa - nod_centre[2]) ** 2)
        frac = np.clip((nod_d / 2 - dist) / min(spacing) + 0.5, 0, 1)  # partial volume at the edge
        hu = hu + frac * (30.0 - hu)
    hu += rng.standard_normal(shape).astype(np.float32) * 15.0
    return hu


def _ct_datasets(hu: np.ndarray, spacing, patient: PatientInfo, when: date, accession: str, root: str):
    study_uid = generate_uid(entropy_srcs=[root, "study"])
    series_uid = generate_uid(entropy_srcs=[root, "series"])
    stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)
    out = []
    nz = hu.shape[0]
    for k in range(nz):
        ds = _base_dataset(CT_SOP_CLASS, generate_uid(entropy_srcs=[root, str(k)]), patient, when, accession,
                           study_uid, series_uid, "CT", 2)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.BodyPartExamined = "CHEST"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-(hu.shape[2] - 1) / 2 * spacing[2], -(hu.shape[1] - 1) / 2 * spacing[1],
                                   (k - (nz - 1) / 2) * spacing[0]]
        ds.SliceThickness = spacing[0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[root, "for"])
        _set_pixels(ds, stored[k], "MONOCHROME2")
        out.append(ds)
    return out


# ----------------------------------------------------------------------------- DICOM writing


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def _base_dataset(sop_class: str, sop_uid: str, patient: PatientInfo, when: date, accession: str,
                  study_uid: str, series_uid: str, modality: str, series_number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["inference.phantoms"])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.patient_name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = accession[-16:]
    ds.AccessionNumber = accession
    d = when.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = d
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.StudyDescription = f"{'XR CHEST' if modality != 'CT' else 'CT CHEST'} (synthetic phantom)"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.Manufacturer = "inference.phantoms"
    ds.SeriesNumber = series_number
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, photometric: str) -> None:
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()


def _dx_dataset(stored: np.ndarray, spacing: float, patient: PatientInfo, when: date, accession: str,
                root: str, view: str, monochrome1: bool) -> Dataset:
    ds = _base_dataset(DX_SOP_CLASS, generate_uid(entropy_srcs=[root, "sop"]), patient, when, accession,
                       generate_uid(entropy_srcs=[root, "study"]), generate_uid(entropy_srcs=[root, "series"]),
                       "DX", 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    # Displayed as if facing the patient: the row runs towards the patient's left.
    ds.PatientOrientation = ["L", "F"] if view in ("PA", "AP", "") else ["P", "F"]
    ds.ImageLaterality = "U"  # unpaired body part
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    if monochrome1:
        _set_pixels(ds, (4095 - stored).astype(np.uint16), "MONOCHROME1")
    else:
        _set_pixels(ds, stored, "MONOCHROME2")
    return ds
