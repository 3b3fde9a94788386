"""The sanity gate: is this pair valid to compare? Runs before any comparison.

Blocking flags refuse the pair (with the reason); non-blocking flags travel with
the result. Header attributes are checked where both sides carry them; the
pixels are checked for blank/saturated images, resent duplicates and for a
flip or 90-degree rotation relative to the prior (from the pixels, since
headers are often wrong exactly when an image was flipped).
"""

from __future__ import annotations

import numpy as np

from .imageops import block_mean, fft_translation, robust_scale
from .types import ImageInput, SanityFlag

# Modalities that may legitimately be compared with each other.
_MODALITY_CLASS = {"CR": "XR", "DX": "XR", "RG": "XR", "DR": "XR"}
_BODY_PART_SYNONYMS = {"THORAX": "CHEST", "LUNG": "CHEST", "PECHO": "CHEST", "TORAX": "CHEST"}
_FRONTAL = {"PA", "AP"}
_LATERAL = {"LAT", "LL", "RL", "LATERAL", "RLD", "LLD"}
_SPECIFIC_LATERALITY = {"R", "L"}
# Plausible physical pixel sizes (mm): projection radiographs, and volume in-plane / slice spacing.
SPACING_2D = (0.03, 2.0)
SPACING_INPLANE_3D = (0.1, 5.0)
SPACING_SLICE_3D = (0.1, 20.0)
FOV_2D_MM = (50.0, 1000.0)
_COARSE_MM = 4.0  # grid of the pixel flip check: anatomy-scale, cheap
_SMALL_ANGLES = (-3.0, 0.0, 3.0)
_FLIP_RESIDUAL_RATIO = 0.8


def check_pair(current: ImageInput, prior: ImageInput) -> list[SanityFlag]:
    flags: list[SanityFlag] = []
    flags += _header_flags(current, prior)
    for role, img in (("current", current), ("prior", prior)):
        flags += _spacing_flags(role, img)
        flags += _exposure_flags(role, img)
        flags += _lossy_flags(role, img)
    if any(f.blocking for f in flags):
        return flags  # pixel comparisons below are meaningless on such a pair
    flags += _duplicate_flags(current, prior)
    if not any(f.code == "duplicate" for f in flags):
        flags += _orientation_flags(current, prior)
    return flags


def _norm_modality(m: str) -> str:
    return _MODALITY_CLASS.get(m.upper(), m.upper())


def _norm_view(v: str) -> str:
    v = v.upper()
    if v in _FRONTAL:
        return v
    if v in _LATERAL:
        return "LAT"
    return v


def _header_flags(cur: ImageInput, pri: ImageInput) -> list[SanityFlag]:
    out = []
    if cur.pixels.ndim != pri.pixels.ndim:
        out.append(SanityFlag("dimension_mismatch",
                              f"current is {cur.pixels.ndim}D, prior is {pri.pixels.ndim}D", True))
    if cur.modality and pri.modality and _norm_modality(cur.modality) != _norm_modality(pri.modality):
        out.append(SanityFlag("modality_mismatch", f"current is {cur.modality}, prior is {pri.modality}", True))
    bc = _BODY_PART_SYNONYMS.get(cur.body_part.upper(), cur.body_part.upper())
    bp = _BODY_PART_SYNONYMS.get(pri.body_part.upper(), pri.body_part.upper())
    if bc and bp and bc != bp:
        out.append(SanityFlag("body_part_mismatch", f"current is {cur.body_part}, prior is {pri.body_part}", True))
    lc, lp = cur.laterality.upper(), pri.laterality.upper()
    if lc in _SPECIFIC_LATERALITY and lp in _SPECIFIC_LATERALITY and lc != lp:
        out.append(SanityFlag("laterality_mismatch", f"current is {lc}, prior is {lp}", True))
    vc, vp = _norm_view(cur.view), _norm_view(pri.view)
    if vc and vp and vc != vp:
        both_frontal = vc in _FRONTAL and vp in _FRONTAL
        reason = f"current view is {cur.view}, prior is {pri.view}"
        if both_frontal:
            reason += " (magnification of the heart and mediastinum differs; compare with caution)"
        out.append(SanityFlag("view_mismatch", reason, not both_frontal))
    if cur.patient_orientation and pri.patient_orientation and vc == vp \
            and tuple(cur.patient_orientation) != tuple(pri.patient_orientation):
        out.append(SanityFlag("orientation_header_mismatch",
                              f"PatientOrientation current {'/'.join(cur.patient_orientation)}, "
                              f"prior {'/'.join(pri.patient_orientation)}", False))
    if cur.acquired_on and pri.acquired_on and pri.acquired_on > cur.acquired_on:
        out.append(SanityFlag("prior_is_newer", f"prior dated {pri.acquired_on} after current "
                              f"{cur.acquired_on}", False))
    return out


def _spacing_flags(role: str, img: ImageInput) -> list[SanityFlag]:
    if not img.spacing_known:
        return [SanityFlag("spacing_unknown", f"{role} image has no pixel spacing; sizes are in pixels", False)]
    sp = img.spacing_mm
    bad = []
    if img.pixels.ndim == 2:
        lo, hi = SPACING_2D
        bad = [s for s in sp if not lo <= s <= hi]
        fov = [n * s for n, s in zip(img.pixels.shape, sp)]
        if not bad and not all(FOV_2D_MM[0] <= f <= FOV_2D_MM[1] for f in fov):
            return [SanityFlag("implausible_spacing", f"{role} image field of view "
                               f"{fov[0]:.0f}x{fov[1]:.0f} mm is implausible", True)]
    else:
        bad = [s for s in sp[1:] if not SPACING_INPLANE_3D[0] <= s <= SPACING_INPLANE_3D[1]]
        if not SPACING_SLICE_3D[0] <= sp[0] <= SPACING_SLICE_3D[1]:
            bad.append(sp[0])
    if bad:
        return [SanityFlag("implausible_spacing", f"{role} pixel spacing {tuple(round(s, 4) for s in sp)} mm "
                           "is outside the plausible range", True)]
    return []


def _lossy_flags(role: str, img: ImageInput) -> list[SanityFlag]:
    if img.lossy_ratio is None:
        return []
    ratio = f" at {img.lossy_ratio:g}:1" if img.lossy_ratio else ""
    return [SanityFlag("lossy_compressed", f"{role} image was lossy-compressed{ratio}; the change map is "
                       "smoothed to the scale of its artefacts, so small changes may be missed", False)]


# Modalities whose images have a black background by design (an ultrasound sector, photographs):
# pixels at the minimum are background there, not an underexposed detector.
_BLACK_BACKGROUND = {"US", "IVUS", "XC", "OP", "ES", "GM", "SM", "OPT"}


def _exposure_flags(role: str, img: ImageInput) -> list[SanityFlag]:
    a = img.pixels
    step = max(1, a.size // 250_000)
    v = a.ravel()[::step]
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        return [SanityFlag("blank_image", f"{role} image is uniform (value {lo:g})", True)]
    p1, p99 = np.percentile(v, [1, 99])
    if p99 - p1 <= 1e-3 * (hi - lo):
        return [SanityFlag("blank_image", f"{role} image has no usable contrast", True)]
    at_hi = float(np.mean(v >= hi - 1e-3 * (hi - lo)))
    at_lo = float(np.mean(v <= lo + 1e-3 * (hi - lo))) if img.modality.upper() not in _BLACK_BACKGROUND else 0.0
    if max(at_hi, at_lo) > 0.5:
        which = "maximum" if at_hi >= at_lo else "minimum"
        return [SanityFlag("saturated_image", f"{role} image: {max(at_hi, at_lo):.0%} of pixels at the "
                           f"{which} value", True)]
    return []


def _duplicate_flags(cur: ImageInput, pri: ImageInput) -> list[SanityFlag]:
    if cur.sop_instance_uid and cur.sop_instance_uid == pri.sop_instance_uid:
        return [SanityFlag("duplicate", "prior has the same SOP Instance UID as current (resent image)", True)]
    if cur.pixels.shape == pri.pixels.shape:
        a, b = cur.pixels, pri.pixels
        step = max(1, a.size // 500_000)
        av, bv = a.ravel()[::step], b.ravel()[::step]
        rng = float(np.ptp(av)) or 1.0
        if float(np.mean(np.abs(av - bv))) < 1e-3 * rng:
            return [SanityFlag("duplicate", "prior pixels are identical to current (resent image)", True)]
    return []


def _coarse(img: ImageInput) -> np.ndarray:
    """A 2D image on a ~4 mm grid (volumes: the mean axial projection)."""
    a = img.pixels if img.pixels.ndim == 2 else img.pixels.mean(axis=0)
    sp = img.spacing_mm[-2:]
    f = tuple(max(1, int(round(_COARSE_MM / s))) for s in sp)
    c = block_mean(a, f)
    return robust_scale(c)


def _dihedral(a: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return [("identity", a), ("flipped left-right", a[:, ::-1]), ("flipped top-bottom", a[::-1, :]),
            ("rotated 180 degrees", a[::-1, ::-1]), ("rotated 90 degrees", np.rot90(a, 1)),
            ("rotated 270 degrees", np.rot90(a, 3)), ("transposed", a.T), ("anti-transposed", np.rot90(a, 2).T)]


def _fit(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre-crop or zero-pad to shape (both images are on the same mm grid)."""
    out = np.zeros(shape, np.float32)
    src, dst = [], []
    for n, m in zip(a.shape, shape):
        if n >= m:
            s = (n - m) // 2
            src.append(slice(s, s + m))
            dst.append(slice(0, m))
        else:
            s = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(s, s + n))
    out[tuple(dst)] = a[tuple(src)]
    return out


def orientation_scores(cur: ImageInput, pri: ImageInput) -> list[tuple[str, float]]:
    """Best translation-aligned NCC of the prior under each flip/90-degree rotation, against the current."""
    from scipy import ndimage

    c = _coarse(cur)
    p = _coarse(pri)
    scores = []
    for name, cand in _dihedral(p):
        fitted = _fit(cand, c.shape)
        best = -1.0
        for angle in _SMALL_ANGLES:  # patients are repositioned by a few degrees between exposures
            rot = fitted if angle == 0 else ndimage.rotate(fitted, angle, reshape=False, order=1)
            best = max(best, fft_translation(c, rot)[1])
        scores.append((name, best))
    return scores


def _orientation_flags(cur: ImageInput, pri: ImageInput) -> list[SanityFlag]:
    scores = orientation_scores(cur, pri)
    ident = scores[0][1]
    name, best = max(scores[1:], key=lambda s: s[1])
    # Chest anatomy is nearly left-right symmetric, so NCCs are close; what differs is the residual
    # dissimilarity (1 - NCC), which a flip leaves clearly larger (heart, hemidiaphragms, aortic knob).
    if best > 0.3 and (1 - best) < _FLIP_RESIDUAL_RATIO * (1 - ident):
        return [SanityFlag("flipped_or_rotated", f"prior appears {name} relative to current "
                           f"(pixel correlation {best:.2f} vs {ident:.2f} as stored)", True)]
    return []
