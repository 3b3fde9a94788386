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
    DENOISE_MM,
    RawRegion,
    change_map,
    contour_2d,
    find_regions,
    longest_diameter_mm,
    lossy_denoise_mm,
)
from .imageops import block_mean, factor_for
from .lesions import TimeImage, measure_finding
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
    """Compare `current` with the most recent usable prior, and measure each finding at every usable
    prior too (its time points). Raises inference.errors.InputError for images that cannot be analysed
    at all; invalid pairs come back refused, with the reasons."""
    t0 = time.perf_counter()
    validate_image(current)
    for p in priors:
        validate_image(p)
    result = ComparisonResult(current_source=current.source)
    if not priors:
        result.no_prior = True
        result.summary = "No prior image: nothing to compare with."
        return _done(result, t0)

    chosen, older, flags = _choose_priors(current, list(priors))
    result.sanity_flags = flags
    if chosen is None:
        result.refused = True
        reasons = "; ".join(f.reason for f in flags if f.blocking)
        result.summary = f"Comparison refused by the sanity gate: {reasons}."
        return _done(result, t0)
    result.prior_source = chosen.source
    result.prior_date = chosen.acquired_on
    if current.is_volume:
        _analyse_volume(current, chosen, older, result, max_side_3d, with_overlay, threads)
    else:
        _analyse_2d(current, chosen, older, result, deformable, max_side, with_overlay, threads)
    return _done(result, t0)


def _done(result: ComparisonResult, t0: float) -> ComparisonResult:
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _by_date(priors: list[ImageInput]) -> list[ImageInput]:
    """Most recent first; undated priors keep their given order, after the dated ones."""
    dated = sorted((p for p in priors if p.acquired_on is not None), key=lambda p: p.acquired_on, reverse=True)
    return dated + [p for p in priors if p.acquired_on is None]


def _choose_priors(current: ImageInput, priors: list[ImageInput]
                   ) -> tuple[ImageInput | None, list[ImageInput], list[SanityFlag]]:
    """The most recent usable prior (compared with), the older usable ones (measured at too, oldest
    first), and the flags. A refused prior is skipped with a non-blocking flag saying why."""
    skipped: list[SanityFlag] = []
    usable: list[tuple[ImageInput, list[SanityFlag]]] = []
    first_flags: list[SanityFlag] | None = None
    for prior in _by_date(priors):
        flags = check_pair(current, prior)
        if first_flags is None:
            first_flags = flags
        if not any(f.blocking for f in flags):
            usable.append((prior, flags))
            continue
        skipped.append(SanityFlag("prior_skipped", f"prior {prior.source or '?'} not used: "
                                  + "; ".join(f.reason for f in flags if f.blocking), False))
    if not usable:
        return None, [], first_flags or []
    seen: set[tuple[str, str]] = set()
    out_flags = list(skipped)
    for _, flags in usable:  # the same warning about the current image once, not once per prior
        for f in flags:
            if (f.code, f.reason) not in seen:
                seen.add((f.code, f.reason))
                out_flags.append(f)
    chosen = usable[0][0]
    return chosen, [p for p, _ in usable[1:]][::-1], out_flags


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


def _time_image(img: ImageInput, pixels: np.ndarray, valid: np.ndarray, to_own=None) -> TimeImage:
    return TimeImage(pixels, valid, img.acquired_on, img.study_instance_uid, img.sop_instance_uid, img.source, to_own)


def _own_pixels(reg, sp: tuple[float, ...], psp: tuple[float, ...], fp: int):
    """Current analysis-grid indices -> the prior's own full-resolution pixels (through the registration)."""
    return lambda pts: reg.to_moving(pts, sp, psp) * fp + fp // 2


def _analyse_2d(cur: ImageInput, pri: ImageInput, older: list[ImageInput], result: ComparisonResult,
                deformable: bool, max_side: int, with_overlay: bool, threads: int) -> None:
    fc = factor_for(cur.pixels.shape, max_side)
    ca = block_mean(cur.pixels, (fc, fc))
    sp = tuple(s * fc for s in cur.spacing_mm)
    result.analysis_spacing_mm = tuple(round(s, 4) for s in sp)

    def registered(prior: ImageInput):
        fp = factor_for(prior.pixels.shape, max_side)
        psp = tuple(s * fp for s in prior.spacing_mm)
        reg = register(ca, sp, block_mean(prior.pixels, (fp, fp)), psp, deformable=deformable, threads=threads)
        return reg, _own_pixels(reg, sp, psp, fp)

    reg, own = registered(pri)
    result.registration = reg.quality
    if _refuse_on_registration(result):
        return
    smooth = lossy_denoise_mm([cur.lossy_ratio, pri.lossy_ratio])
    cm = change_map(ca, reg.warped, reg.valid, sp, smooth)
    lo, hi = np.percentile(ca[:: max(1, ca.shape[0] // 256)], [1, 99])
    raw = find_regions(cm, sp, float(hi - lo))
    times, older_maps = _older_times(older, result, lambda p: registered(p), ca, sp, smooth)
    times += [_time_image(pri, cm.prior, cm.analysed, own),
              _time_image(cur, cm.current, cm.analysed, lambda pts: np.asarray(pts, float) * fc + fc // 2)]
    found = [(r, len(times) - 2) for r in raw]
    extent = {id(r): (r.mask, r.offset) for r in raw}  # where each finding is measured
    # A change too small to see since the last visit may be clear against an older one (a lesion
    # shrinking slowly): regions found only against an older prior join, measured the same way.
    # One that overlaps a shrinking finding widens where that finding is measured: the lesion was
    # larger at the older visit and reaches beyond the change since the last one.
    for k in range(len(older_maps) - 1, -1, -1):
        for r in find_regions(older_maps[k], sp, float(hi - lo)):
            same = [other for other, _ in found if _overlap(r, other)]
            if not same:
                found.append((r, k))
                extent[id(r)] = (r.mask, r.offset)
            for other in same:
                if other.sign == r.sign < 0:
                    extent[id(other)] = _union(*extent[id(other)], r.mask, r.offset)
    raw = [r for r, _ in found]
    if _is_chest(cur):
        warped_filled = np.where(reg.valid, reg.warped, np.median(reg.warped[reg.valid]))
        geo = chest_geometry([ca, warped_filled])
        zone_of = lambda r, c: chest_zone(geo, r, c, cur.view)  # noqa: E731
    else:
        zone_of = lambda r, c: image_region(ca.shape, r, c)  # noqa: E731
    regions = [_region_2d(r, fc, sp, cur.pixels.shape, zone_of, times, k, extent[id(r)]) for r, k in found]
    regions.sort(key=lambda r: (r.confidence * r.area_mm2), reverse=True)
    result.regions = regions
    result.findings = [_finding(r) for r in regions]
    result.summary = _summary(regions)
    if with_overlay:
        result.overlay = make_overlay(ca, cm.z, cm.analysed, [_scaled_bbox(r.bbox, fc) for r in regions])


def _older_times(older: list[ImageInput], result: ComparisonResult, registered, ca: np.ndarray,
                 sp: tuple[float, ...], smooth: float = DENOISE_MM) -> tuple[list[TimeImage], list]:
    """The older priors on the analysis grid, oldest first, with their change maps against the current."""
    result.priors_compared = [p.source for p in older] + [result.prior_source]
    times, maps = [], []
    for prior in older:
        reg, own = registered(prior)
        if not reg.quality.succeeded:
            result.sanity_flags.append(SanityFlag(
                "prior_skipped", f"prior {prior.source or '?'} not measured: registration failed "
                f"(NCC {reg.quality.ncc_after:.2f})", False))
            result.priors_compared.remove(prior.source)
            continue
        cm = change_map(ca, reg.warped, reg.valid, sp, smooth)
        times.append(_time_image(prior, cm.prior, cm.analysed, own))
        maps.append(cm)
    return times, maps


def _overlap(a: RawRegion, b: RawRegion) -> bool:
    """Masks on the same analysis grid share a pixel."""
    lo = [max(x, y) for x, y in zip(a.offset, b.offset)]
    hi = [min(x + n, y + m) for x, y, n, m in zip(a.offset, b.offset, a.mask.shape, b.mask.shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return False
    sa = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, a.offset))
    sb = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, b.offset))
    return bool((a.mask[sa] & b.mask[sb]).any())


def _union(a: np.ndarray, a_offset: tuple[int, ...], b: np.ndarray, b_offset: tuple[int, ...]):
    """Two masks on the same analysis grid as one (mask, offset)."""
    lo = [min(x, y) for x, y in zip(a_offset, b_offset)]
    hi = [max(x + n, y + m) for x, y, n, m in zip(a_offset, b_offset, a.shape, b.shape)]
    out = np.zeros([h - l for l, h in zip(lo, hi)], bool)
    for m, o in ((a, a_offset), (b, b_offset)):
        out[tuple(slice(x - l, x - l + n) for x, l, n in zip(o, lo, m.shape))] |= m
    return out, tuple(lo)


def _scaled_bbox(bbox, f: int) -> tuple[int, ...]:
    return tuple(int(v // f) for v in bbox)


def _region_2d(r: RawRegion, f: int, sp: tuple[float, ...], full_shape, zone_of, times: list[TimeImage],
               found_against: int | None = None, extent: tuple | None = None) -> ChangeRegion:
    rr, cc = np.nonzero(r.mask)
    r0, c0 = r.offset
    contour = [(p[0] + r0, p[1] + c0) for p in contour_2d(r.mask)]
    diameter = longest_diameter_mm(np.array(contour if len(contour) > 1 else [(r0, c0)]), sp)
    zone = zone_of(rr.mean() + r0, cc.mean() + c0)
    bbox = (min(full_shape[0], (rr.min() + r0) * f), min(full_shape[1], (cc.min() + c0) * f),
            min(full_shape[0], (rr.max() + r0 + 1) * f), min(full_shape[1], (cc.max() + c0 + 1) * f))
    measured = _measure(r, times, sp, found_against, extent)
    status = measured.status if measured else r.status
    return ChangeRegion(
        zone=zone, bbox=tuple(int(v) for v in bbox), area_mm2=round(float(r.mask.sum() * sp[0] * sp[1]), 1),
        longest_diameter_mm=round(diameter, 1), mean_change=round(r.mean_change, 4), status=status,
        confidence=r.confidence, contour=tuple((int(a * f + f // 2), int(b * f + f // 2)) for a, b in contour),
        kind="increase" if r.sign > 0 else "decrease",
        timepoints=tuple(measured.timepoints) if measured else (), trend=measured.trend if measured else "",
        lesion_type=_lesion_type(measured, zone))


def _measure(r: RawRegion, times: list[TimeImage], sp: tuple[float, ...], found_against: int | None = None,
             extent: tuple | None = None):
    """The finding at every time point (inference.lesions), within `extent` (mask, offset; default the
    region's own); presence now and at the compared prior from the change profile (new: absent before;
    resolved: absent now)."""
    mask, offset = extent or (r.mask, r.offset)
    present_now = r.status not in ("resolved",)
    present_recent = r.status not in ("new",)
    if r.status == "indeterminate":
        present_now = present_recent = True
    if found_against is not None and found_against != len(times) - 2:
        present_now = None  # found against an older prior: whether it is still there is measured, like the rest
    return measure_finding(mask, offset, times, len(times) - 2, present_now, present_recent, sp, found_against,
                           r.sign)


def _lesion_type(measured, zone: str) -> str:
    """Only what the analysis can tell: a focal opacity (compact, up to 3 cm), a basal opacity (lower zone,
    wide), else a diffuse change. No diagnosis."""
    if measured is None:
        return ""
    sizes = [t for t in measured.timepoints if t.present]
    if not sizes:
        return ""
    big = max(sizes, key=lambda t: t.area_mm2 or 0.0)
    long_axis, short_axis = big.long_axis_mm or 0.0, big.short_axis_mm or 0.0
    if long_axis <= 30.0 and short_axis >= 0.6 * long_axis:
        return "focal opacity"
    if "lower" in zone and long_axis > 30.0:
        return "basal opacity"
    return "diffuse change"


def _analyse_volume(cur: ImageInput, pri: ImageInput, older: list[ImageInput], result: ComparisonResult,
                    max_side: int, with_overlay: bool, threads: int) -> None:
    fc = factor_for(cur.pixels.shape[1:], max_side)
    ca = block_mean(cur.pixels, (1, fc, fc))
    sp = (cur.spacing_mm[0], cur.spacing_mm[1] * fc, cur.spacing_mm[2] * fc)
    result.analysis_spacing_mm = tuple(round(s, 4) for s in sp)

    def registered(prior: ImageInput):
        fp = factor_for(prior.pixels.shape[1:], max_side)
        psp = (prior.spacing_mm[0], prior.spacing_mm[1] * fp, prior.spacing_mm[2] * fp)
        reg = register(ca, sp, block_mean(prior.pixels, (1, fp, fp)), psp, deformable=False, threads=threads)
        return reg, None  # rigid only for volumes; outlines on prior volumes are not mapped back

    reg, _ = registered(pri)
    result.registration = reg.quality
    if _refuse_on_registration(result):
        return
    cm = change_map(ca, reg.warped, reg.valid, sp)
    lo, hi = np.percentile(ca[:, ::4, ::4], [1, 99])
    raw = find_regions(cm, sp, float(hi - lo))
    if raw:  # volumes: older priors only to measure what changed since the most recent one
        times, _ = _older_times(older, result, registered, ca, sp)
    else:
        times, result.priors_compared = [], [p.source for p in older] + [result.prior_source]
    times += [_time_image(pri, cm.prior, cm.analysed), _time_image(cur, cm.current, cm.analysed)]
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
        measured = _measure(r, times, sp)
        regions.append(ChangeRegion(
            zone=zone,
            bbox=(int((kr.min() + r0) * f), int((kc.min() + c0) * f), int((kr.max() + r0 + 1) * f),
                  int((kc.max() + c0 + 1) * f)),
            area_mm2=round(float(key.sum() * sp[1] * sp[2]), 1), longest_diameter_mm=round(diameter, 1),
            mean_change=round(r.mean_change, 4), status=measured.status, confidence=r.confidence,
            contour=tuple((int(a * f + f // 2), int(b * f + f // 2)) for a, b in contour),
            timepoints=tuple(measured.timepoints), trend=measured.trend, lesion_type=_lesion_type(measured, zone),
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


def _mm(t) -> str:
    if t.volume_mm3 is not None:
        return f"{t.long_axis_mm:.0f} mm ({t.volume_mm3:.0f} mm3)"
    return f"{t.long_axis_mm:.0f} x {t.short_axis_mm:.0f} mm ({t.area_mm2:.0f} mm2)"


def trajectory_text(r: ChangeRegion) -> str:
    """'16 x 14 mm (202 mm2) now; 9 x 8 mm (60 mm2) on 2024-01-10; absent on 2023-01-10'."""
    parts = []
    for i, t in enumerate(reversed(r.timepoints)):
        when = "now" if i == 0 else f"on {t.date.isoformat() if t.date else 'an undated prior'}"
        parts.append(f"{_mm(t)} {when}" if t.present else f"absent {when}")
    return "; ".join(parts)


def _finding(r: ChangeRegion) -> str:
    what = r.lesion_type or ("increased density" if r.kind == "increase" else "decreased density")
    if r.timepoints:
        trend = f", trend {r.trend}" if r.trend and len(r.timepoints) > 2 else ""
        return f"{r.status}: {what} in {r.zone}, {trajectory_text(r)}{trend} (confidence {r.confidence:.2f})"
    size = f"{r.volume_mm3:.0f} mm3" if r.volume_mm3 is not None else f"{r.area_mm2:.0f} mm2"
    return (f"{r.status}: {what} in {r.zone}, {size}, longest diameter {r.longest_diameter_mm:.0f} mm "
            f"(confidence {r.confidence:.2f})")


def _summary(regions: list[ChangeRegion]) -> str:
    """Sentences, most prominent finding first."""
    if not regions:
        return "No measurable change between prior and current."
    counts: dict[str, int] = {}
    for r in regions:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in counts.items())
    top = regions[0]
    what = top.lesion_type or "region of change"
    now = top.current_timepoint
    if now is not None and now.present:
        size = f"now measuring {now.long_axis_mm:.0f} mm"
    elif top.timepoints and top.timepoints[-2].present:
        size = f"previously measuring {top.timepoints[-2].long_axis_mm:.0f} mm"
    else:
        size = f"{top.longest_diameter_mm:.0f} mm"
    n = len(regions)
    article = "an" if top.status[0] in "aeiou" else "a"
    return (f"{n} measured finding{'s' if n != 1 else ''} changed since the prior ({parts}). "
            f"Most prominent: {article} {top.status} {what} in the {top.zone}, {size}.")


__all__ = ["compare"]
