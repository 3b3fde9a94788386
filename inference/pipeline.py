"""compare(current, priors): sanity gate -> pick prior -> register -> change map -> measured regions.

Analysis runs on a grid of at most `max_side` pixels (0.8 mm for a 43 cm chest
film at 512 px: fine enough for 5 mm nodules, and what keeps a 2048x2048 pair
well under 2 s on 2 cores); regions are reported back in current-image pixel
coordinates and millimetres.
"""

from __future__ import annotations

import time
import numpy as np

from .change import (
    RawRegion,
    change_map,
    contour_2d,
    find_regions,
    longest_diameter_mm,
)
from .imageops import block_mean, factor_for
from .overlay import make_overlay
from .pixels import validate_image
from .registration import register
from .sanity import check_pair
from .types import ChangeRegion, ComparisonResult, ImageInput, SanityFlag
from .zones import chest_geometry, chest_zone, image_region, volume_zone

_CHEST = {"CHEST", "THORAX", "LUNG"}
_XR = {"CR", "DX", "RG", "DR"}


def compare(current: ImageInput, priors: list[ImageInput] | tuple[ImageInput, ...], *,
            deformable: bool = False, max_side: int = 512, max_side_3d: int = 256,
            with_overlay: bool = True, threads: int = 2) -> ComparisonResult:
    """Compare `current` with the most recent usable prior. Raises inference.errors.InputError for
    images that cannot be analysed at all; invalid pairs come back refused, with the reasons."""
    t0 = time.perf_counter()
    validate_image(current)
    for p in priors:
        validate_image(p)
    result = ComparisonResult(current_source=current.source)
    if not priors:
        result.no_prior = True
        result.summary = "No prior image: nothing to compare with."
        return _done(result, t0)

    chosen, flags = _choose_prior(current, list(priors))
    result.sanity_flags = flags
    if chosen is None:
        result.refused = True
        reasons = "; ".join(f.reason for f in flags if f.blocking)
        result.summary = f"Comparison refused by the sanity gate: {reasons}."
        return _done(result, t0)
    result.prior_source = chosen.source
    result.prior_date = chosen.acquired_on
    if current.is_volume:
        _analyse_volume(current, chosen, result, deformable, max_side_3d, with_overlay, threads)
    else:
        _analyse_2d(current, chosen, result, deformable, max_side, with_overlay, threads)
    return _done(result, t0)


def _done(result: ComparisonResult, t0: float) -> ComparisonResult:
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _choose_prior(current: ImageInput, priors: list[ImageInput]) -> tuple[ImageInput | None, list[SanityFlag]]:
    """Most recent prior first (undated last); older ones are tried only if a newer one is refused."""
    ordered = sorted(priors, key=lambda p: (p.acquired_on is not None, p.acquired_on or 0), reverse=True) \
        if all(p.acquired_on is not None for p in priors) else priors
    skipped: list[SanityFlag] = []
    first_flags: list[SanityFlag] | None = None
    for prior in ordered:
        flags = check_pair(current, prior)
        if first_flags is None:
            first_flags = flags
        if not any(f.blocking for f in flags):
            return prior, skipped + flags
        skipped.append(SanityFlag("prior_skipped", f"prior {prior.source or '?'} not used: "
                                  + "; ".join(f.reason for f in flags if f.blocking), False))
    return None, first_flags or []


def _is_chest(img: ImageInput) -> bool:
    return img.body_part in _CHEST or (not img.body_part and img.modality in _XR)


def _refuse_on_registration(result: ComparisonResult) -> bool:
    q = result.registration
    if q is not None and not q.succeeded:
        result.refused = True
        result.sanity_flags.append(SanityFlag(
            "registration_failed", f"registration failed (NCC {q.ncc_before:.2f} -> {q.ncc_after:.2f}); "
            "no change is claimed", True))
        result.summary = "Registration of the prior onto the current failed; changes were not assessed."
        return True
    return False


def _analyse_2d(cur: ImageInput, pri: ImageInput, result: ComparisonResult, deformable: bool,
                max_side: int, with_overlay: bool, threads: int) -> None:
    fc = factor_for(cur.pixels.shape, max_side)
    fp = factor_for(pri.pixels.shape, max_side)
    ca = block_mean(cur.pixels, (fc, fc))
    pa = block_mean(pri.pixels, (fp, fp))
    sp = tuple(s * fc for s in cur.spacing_mm)
    result.analysis_spacing_mm = tuple(round(s, 4) for s in sp)
    reg = register(ca, sp, pa, tuple(s * fp for s in pri.spacing_mm), deformable=deformable, threads=threads)
    result.registration = reg.quality
    if _refuse_on_registration(result):
        return
    cm = change_map(ca, reg.warped, reg.valid, sp)
    lo, hi = np.percentile(ca[:: max(1, ca.shape[0] // 256)], [1, 99])
    raw = find_regions(cm, sp, float(hi - lo))
    if _is_chest(cur):
        warped_filled = np.where(reg.valid, reg.warped, np.median(reg.warped[reg.valid]))
        geo = chest_geometry([ca, warped_filled])
        zone_of = lambda r, c: chest_zone(geo, r, c, cur.view)  # noqa: E731
    else:
        zone_of = lambda r, c: image_region(ca.shape, r, c)  # noqa: E731
    regions = [_region_2d(r, fc, sp, cur.pixels.shape, zone_of) for r in raw]
    regions.sort(key=lambda r: (r.confidence * r.area_mm2), reverse=True)
    result.regions = regions
    result.findings = [_finding(r) for r in regions]
    result.summary = _summary(regions)
    if with_overlay:
        result.overlay = make_overlay(ca, cm.z, cm.analysed, [_scaled_bbox(r.bbox, fc) for r in regions])


def _scaled_bbox(bbox, f: int) -> tuple[int, ...]:
    return tuple(int(v // f) for v in bbox)


def _region_2d(r: RawRegion, f: int, sp: tuple[float, ...], full_shape, zone_of) -> ChangeRegion:
    rr, cc = np.nonzero(r.mask)
    r0, c0 = r.offset
    contour = [(p[0] + r0, p[1] + c0) for p in contour_2d(r.mask)]
    diameter = longest_diameter_mm(np.array(contour if len(contour) > 1 else [(r0, c0)]), sp)
    zone = zone_of(rr.mean() + r0, cc.mean() + c0)
    bbox = (min(full_shape[0], (rr.min() + r0) * f), min(full_shape[1], (cc.min() + c0) * f),
            min(full_shape[0], (rr.max() + r0 + 1) * f), min(full_shape[1], (cc.max() + c0 + 1) * f))
    return ChangeRegion(
        zone=zone, bbox=tuple(int(v) for v in bbox), area_mm2=round(float(r.mask.sum() * sp[0] * sp[1]), 1),
        longest_diameter_mm=round(diameter, 1), mean_change=round(r.mean_change, 4), status=r.status,
        confidence=r.confidence, contour=tuple((int(a * f + f // 2), int(b * f + f // 2)) for a, b in contour),
        kind="increase" if r.sign > 0 else "decrease")


def _analyse_volume(cur: ImageInput, pri: ImageInput, result: ComparisonResult, deformable: bool,
                    max_side: int, with_overlay: bool, threads: int) -> None:
    fc = factor_for(cur.pixels.shape[1:], max_side)
    fp = factor_for(pri.pixels.shape[1:], max_side)
    ca = block_mean(cur.pixels, (1, fc, fc))
    pa = block_mean(pri.pixels, (1, fp, fp))
    sp = (cur.spacing_mm[0], cur.spacing_mm[1] * fc, cur.spacing_mm[2] * fc)
    result.analysis_spacing_mm = tuple(round(s, 4) for s in sp)
    psp = (pri.spacing_mm[0], pri.spacing_mm[1] * fp, pri.spacing_mm[2] * fp)
    reg = register(ca, sp, pa, psp, deformable=False, threads=threads)  # rigid only for volumes
    result.registration = reg.quality
    if _refuse_on_registration(result):
        return
    cm = change_map(ca, reg.warped, reg.valid, sp)
    lo, hi = np.percentile(ca[:, ::4, ::4], [1, 99])
    raw = find_regions(cm, sp, float(hi - lo))
    body = ca > (lo + hi) / 2 if hi > lo else np.ones_like(ca, bool)
    body_col = float(np.nonzero(body)[2].mean()) if body.any() else ca.shape[2] / 2
    regions = []
    for r in raw:
        zz, rr, cc = np.nonzero(r.mask)
        z0, r0, c0 = r.offset
        areas = r.mask.sum(axis=(1, 2))
        k = int(np.argmax(areas))
        key = r.mask[k]
        kr, kc = np.nonzero(key)
        contour = [(p[0] + r0, p[1] + c0) for p in contour_2d(key)]
        pts = np.stack([zz + z0, rr + r0, cc + c0], 1)
        diameter = longest_diameter_mm(pts, sp)
        zone = volume_zone(ca.shape, body_col, zz.mean() + z0, rr.mean() + r0, cc.mean() + c0, _is_chest(cur))
        f = fc
        regions.append(ChangeRegion(
            zone=zone,
            bbox=(int((kr.min() + r0) * f), int((kc.min() + c0) * f), int((kr.max() + r0 + 1) * f),
                  int((kc.max() + c0 + 1) * f)),
            area_mm2=round(float(key.sum() * sp[1] * sp[2]), 1), longest_diameter_mm=round(diameter, 1),
            mean_change=round(r.mean_change, 4), status=r.status, confidence=r.confidence,
            contour=tuple((int(a * f + f // 2), int(b * f + f // 2)) for a, b in contour),
            volume_mm3=round(float(r.mask.sum() * np.prod(sp)), 1),
            bbox_3d=(int(zz.min() + z0), int((rr.min() + r0) * f), int((cc.min() + c0) * f),
                     int(zz.max() + z0 + 1), int((rr.max() + r0 + 1) * f), int((cc.max() + c0 + 1) * f)),
            key_slice=int(k + z0), kind="increase" if r.sign > 0 else "decrease"))
    regions.sort(key=lambda r: (r.confidence * (r.volume_mm3 or 0)), reverse=True)
    result.regions = regions
    result.findings = [_finding(r) for r in regions]
    result.summary = _summary(regions)
    if with_overlay:
        k = regions[0].key_slice if regions else ca.shape[0] // 2
        boxes = [_scaled_bbox(r.bbox, fc) for r in regions if r.key_slice == k]
        result.overlay = make_overlay(ca[k], cm.z[k], cm.analysed[k], boxes)


def _finding(r: ChangeRegion) -> str:
    size = f"{r.volume_mm3:.0f} mm3" if r.volume_mm3 is not None else f"{r.area_mm2:.0f} mm2"
    direction = "increased density" if r.kind == "increase" else "decreased density"
    return (f"{r.status}: {direction} in {r.zone}, {size}, longest diameter {r.longest_diameter_mm:.0f} mm "
            f"(confidence {r.confidence:.2f})")


def _summary(regions: list[ChangeRegion]) -> str:
    if not regions:
        return "No measurable change between prior and current."
    counts: dict[str, int] = {}
    for r in regions:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in counts.items())
    top = regions[0]
    return (f"{len(regions)} region(s) of change ({parts}); most prominent: {top.status} in {top.zone}, "
            f"{top.longest_diameter_mm:.0f} mm.")


__all__ = ["compare"]
