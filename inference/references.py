"""Comparison against normal references (other, healthy people) when the patient has no usable prior.

Each selected normal radiograph is registered deformably onto the query (the same
`register` as prior comparison, affine + B-spline), mapped onto the query's exposure
(the tone curve and spatial trend of change.py), then aligned locally by demons with
a smooth field (6 mm: another person's ribs and borders move onto the query's, a
12 mm nodule cannot be made or erased), and denoised (2.5 mm: two people's fine
parenchymal texture does not cancel). Per pixel, the references give a normal
model: their median, and their spread (MAD across references, smoothed, weighted,
with a floor from the query's own residual, since five people cannot estimate a
spread pixel by pixel). The query's deviation from the median in units of that
spread, less half of the largest deviation that the normals themselves show
nearby (each reference against the other four: where different people differ
anyway, e.g. heart borders, a query must differ more), goes through the same
region finder as prior comparison. Regions are "present": atypical for normals,
with no claim about change over time.

Also the lightweight image descriptor used to match references: a 32 x 32
thumbnail of the image, cropped to its body and robust-scaled, compared by NCC.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from .change import Z_GROW, ChangeMap, RawRegion, _normalise, contour_2d, find_regions, longest_diameter_mm
from .imageops import block_mean, factor_for, resize_to, robust_scale
from .overlay import make_overlay
from .pixels import validate_image
from .registration import register
from .types import PRESENT, ChangeRegion, ComparisonResult, ImageInput, ReferenceUse, SanityFlag
from .zones import chest_geometry, chest_zone, image_region

DESCRIPTOR_KIND = "thumb32-v1"  # stored with each library entry; descriptors of another kind are not compared
DESCRIPTOR_SIDE = 32
MIN_MODEL_REFERENCES = 3  # fewer registered references: no per-pixel spread, the floor alone
FULL_CONFIDENCE_REFERENCES = 5  # confidence is scaled down below this many registered references
SPREAD_SMOOTH_PX = 3.0  # analysis pixels; a per-pixel MAD of five values is noisy
SPREAD_FLOOR = 1.0  # x the robust sigma of (query - normal median) over the analysed field
# The references' MAD enters the spread at this weight: with five references it overstates the
# variation where their ribs still disagree after alignment (measured on the synthetic library).
MAD_WEIGHT = 0.75
LOO_WEIGHT = 0.5  # share of the normals' own largest nearby deviation (each against the others) discounted
LOO_NEIGHBOURHOOD_PX = 5
DENOISE_MM = 2.5  # coarser than a prior pair's 1.2 mm: two people's fine texture does not cancel
REFINE_SIGMA_MM = 6.0  # demons field smoothness: moves ribs and borders, cannot make or erase a 12 mm blob
REFINE_ITERATIONS = 30
REF_MAX_SIDE = 256  # analysis grid (1.7 mm for a 43 cm film): five references, so coarser than a prior pair's 512


def descriptor(img: ImageInput) -> np.ndarray:
    """32 x 32 thumbnail (float32, zero mean, unit norm) of the image cropped to its body."""
    a = img.pixels if img.pixels.ndim == 2 else img.pixels[img.pixels.shape[0] // 2]
    f = factor_for(a.shape, 128)
    small = robust_scale(block_mean(a.astype(np.float32), (f, f)))
    body = small > 0.1
    if body.sum() > 0.05 * body.size:
        rr, cc = np.nonzero(body)
        small = small[rr.min():rr.max() + 1, cc.min():cc.max() + 1]
    thumb = resize_to(small, (DESCRIPTOR_SIDE, DESCRIPTOR_SIDE)).astype(np.float32).ravel()
    thumb -= thumb.mean()
    return thumb / max(float(np.linalg.norm(thumb)), 1e-9)


def descriptor_similarity(a: Sequence[float], b: Sequence[float]) -> float:
    """NCC of two descriptors, -1..1."""
    x, y = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if x.shape != y.shape or not x.size:
        return 0.0
    return float(np.dot(x, y) / max(float(np.linalg.norm(x) * np.linalg.norm(y)), 1e-9))


def compare_with_references(query: ImageInput, references: Sequence[ImageInput],
                            uses: Sequence[ReferenceUse] | None = None, *, max_side: int = REF_MAX_SIDE,
                            with_overlay: bool = True, threads: int = 2) -> ComparisonResult:
    """Regions where `query` deviates beyond the variation of the normal `references`.

    `uses` (one per reference, same order) names each reference and why it was chosen; it comes back
    in result.references with the registration outcome filled in."""
    from scipy import ndimage

    t0 = time.perf_counter()
    validate_image(query)
    uses = list(uses) if uses is not None else [ReferenceUse(r.source, "") for r in references]
    if len(uses) != len(references):
        raise ValueError("compare_with_references: one ReferenceUse per reference")
    result = ComparisonResult(current_source=query.source, mode="reference", no_prior=True)
    if not references:
        result.summary = "No normal reference: nothing to compare with."
        return _done(result, t0)
    if query.is_volume:
        result.summary = "Comparison against normal references covers radiographs only; volumes are read alone."
        result.references = uses
        return _done(result, t0)

    fq = factor_for(query.pixels.shape, max_side)
    qa = block_mean(query.pixels, (fq, fq))
    sp = tuple(s * fq for s in query.spacing_mm)
    result.analysis_spacing_mm = tuple(round(s, 4) for s in sp)
    # Smoother than a prior pair (1.2 mm): another person's parenchymal texture and the query's own
    # are fine-scale and do not cancel; a 12 mm nodule survives this almost whole.
    sigma = [max(0.6, DENOISE_MM / s) for s in sp]
    q_s = ndimage.gaussian_filter(qa, sigma)

    for ref in references:
        validate_image(ref)

    def align(ref: ImageInput):
        """One reference on the query grid: (normalised, aligned, denoised normal; valid mask; quality)."""
        if ref.is_volume:
            return None, None, None
        fr = factor_for(ref.pixels.shape, max_side)
        ra = block_mean(ref.pixels, (fr, fr))
        try:
            reg = register(qa, sp, ra, tuple(s * fr for s in ref.spacing_mm), deformable=True, threads=threads)
        except RuntimeError:  # SimpleITK gave up (no overlap at all): this reference is left out
            return None, None, None
        if not reg.quality.succeeded:
            return None, None, reg.quality
        analysed = ndimage.binary_erosion(reg.valid, iterations=3)
        normal = _refine(qa, _normalise(qa, reg.warped, analysed, tilt=False), analysed, sp)
        return ndimage.gaussian_filter(normal, sigma), analysed, reg.quality

    # One after the other: SimpleITK registrations run side by side in threads failed spuriously.
    aligned = [align(ref) for ref in references]
    normals, valids, out_uses = [], [], []
    for (normal, valid, quality), use in zip(aligned, uses):
        out_uses.append(_with(use, quality is not None and quality.succeeded, quality.ncc_after if quality else 0.0))
        if normal is not None:
            normals.append(normal)
            valids.append(valid)
    result.references = out_uses
    if not normals:
        result.sanity_flags.append(SanityFlag(
            "references_unregistered", "no normal reference could be registered onto the query", True))
        result.refused = True
        result.summary = "No normal reference could be registered onto the image; it was read alone."
        return _done(result, t0)

    cm = _normal_model(q_s, np.stack(normals), np.stack(valids))
    lo, hi = np.percentile(qa[:: max(1, qa.shape[0] // 256)], [1, 99])
    raw = find_regions(cm, sp, float(hi - lo))
    if query.body_part in ("CHEST", "THORAX", "LUNG") or (not query.body_part and query.modality in ("CR", "DX")):
        geo = chest_geometry([qa])
        zone_of = lambda r, c: chest_zone(geo, r, c, query.view)  # noqa: E731
    else:
        zone_of = lambda r, c: image_region(qa.shape, r, c)  # noqa: E731
    scale = math.sqrt(min(1.0, len(normals) / FULL_CONFIDENCE_REFERENCES))
    regions = []
    for r in raw:
        confidence = (1.0 - math.exp(-(r.mean_z - Z_GROW) / 4.0)) * scale
        regions.append(_region(r, fq, sp, query.pixels.shape, zone_of, round(float(np.clip(confidence, 0.05, 0.99)), 3)))
    regions.sort(key=lambda r: r.confidence * r.area_mm2, reverse=True)
    result.regions = regions
    result.findings = [_finding(r) for r in regions]
    result.summary = _summary(regions, len(normals))
    if len(normals) < len(references):
        result.sanity_flags.append(SanityFlag(
            "references_skipped", f"{len(references) - len(normals)} of {len(references)} normal references "
            "could not be registered onto the query and were left out", False))
    if with_overlay:
        result.overlay = make_overlay(qa, cm.z, cm.analysed, [tuple(v // fq for v in r.bbox) for r in regions])
    return _done(result, t0)


def _normal_model(query: np.ndarray, normals: np.ndarray, valids: np.ndarray) -> ChangeMap:
    """Deviation of the query from the references' per-pixel median, in units of their spread."""
    from scipy import ndimage

    analysed = valids.sum(0) >= max(1, (len(normals) + 1) // 2)
    median = np.where(analysed, _masked_median(normals, valids), query).astype(np.float32)
    resid = (query - median)[analysed]
    floor = SPREAD_FLOOR * 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) if resid.size else 1.0
    floor = max(floor, 1e-6)
    if len(normals) >= MIN_MODEL_REFERENCES:
        mad = 1.4826 * np.where(analysed, _masked_median(np.abs(normals - median), valids), floor)
        mad = ndimage.gaussian_filter(mad.astype(np.float32), SPREAD_SMOOTH_PX)
        spread = np.maximum(MAD_WEIGHT * mad, floor)
    else:
        spread = np.full(query.shape, floor, np.float32)
    diff = np.where(analysed, query - median, 0.0).astype(np.float32)
    z = (diff / spread).astype(np.float32)
    if len(normals) >= MIN_MODEL_REFERENCES:
        # What normals themselves show here: each reference against the others. The query is only
        # atypical by what exceeds the largest such deviation nearby (heart borders, diaphragm, lung
        # apices of different people otherwise pass for findings).
        loo = []
        for i in range(len(normals)):
            others = np.delete(np.arange(len(normals)), i)
            m_i = _masked_median(normals[others], valids[others])
            loo.append(np.where(valids[i] & analysed, (normals[i] - m_i) / spread, 0.0))
        loo = np.stack(loo)
        above = ndimage.maximum_filter(np.clip(loo.max(0), 0, None), size=LOO_NEIGHBOURHOOD_PX)
        below = ndimage.maximum_filter(np.clip(-loo.min(0), 0, None), size=LOO_NEIGHBOURHOOD_PX)
        z = np.where(z > 0, np.clip(z - LOO_WEIGHT * above, 0, None), np.clip(z + LOO_WEIGHT * below, None, 0))
        z = z.astype(np.float32)
        diff = (z * spread).astype(np.float32)
    return ChangeMap(diff, z, query, median, floor, analysed)


def _masked_median(stack: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-pixel median over the valid entries of a short stack (np.nanmedian is ~10x slower)."""
    ordered = np.sort(np.where(valid, stack, np.inf), axis=0)
    n = np.maximum(valid.sum(0), 1)
    lo = np.take_along_axis(ordered, ((n - 1) // 2)[None], 0)[0]
    hi = np.take_along_axis(ordered, (n // 2)[None], 0)[0]
    return np.where(valid.any(0), (lo + hi) / 2, 0.0).astype(np.float32)


def _refine(query: np.ndarray, normal: np.ndarray, mask: np.ndarray, sp) -> np.ndarray:
    """Local alignment of another person's ribs and borders onto the query: demons with a smooth field."""
    import SimpleITK as sitk

    fill = float(np.median(normal[mask]))
    f = sitk.GetImageFromArray(np.ascontiguousarray(query, np.float32))
    m = sitk.GetImageFromArray(np.ascontiguousarray(np.where(mask, normal, fill), np.float32))
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(REFINE_ITERATIONS)
    demons.SetStandardDeviations(REFINE_SIGMA_MM / min(sp))
    field = demons.Execute(f, m)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    out = sitk.GetArrayFromImage(sitk.Resample(m, f, tx, sitk.sitkLinear, fill))
    return np.where(mask, out, normal).astype(np.float32)


def _with(use: ReferenceUse, registered: bool, ncc_after: float) -> ReferenceUse:
    from dataclasses import replace

    return replace(use, registered=registered, ncc_after=round(float(ncc_after), 4))


def _region(r: RawRegion, f: int, sp: tuple[float, ...], full_shape, zone_of, confidence: float) -> ChangeRegion:
    """The region in query-image pixels (the analysis grid is `f` times coarser)."""
    rr, cc = np.nonzero(r.mask)
    r0, c0 = r.offset
    contour = [(p[0] + r0, p[1] + c0) for p in contour_2d(r.mask)]
    diameter = longest_diameter_mm(np.array(contour if len(contour) > 1 else [(r0, c0)]), sp)
    bbox = (min(full_shape[0], (rr.min() + r0) * f), min(full_shape[1], (cc.min() + c0) * f),
            min(full_shape[0], (rr.max() + r0 + 1) * f), min(full_shape[1], (cc.max() + c0 + 1) * f))
    return ChangeRegion(
        zone=zone_of(rr.mean() + r0, cc.mean() + c0), bbox=tuple(int(v) for v in bbox),
        area_mm2=round(float(r.mask.sum() * sp[0] * sp[1]), 1), longest_diameter_mm=round(diameter, 1),
        mean_change=round(r.mean_change, 4), status=PRESENT, confidence=confidence,
        contour=tuple((int(a * f + f // 2), int(b * f + f // 2)) for a, b in contour),
        kind="increase" if r.sign > 0 else "decrease")


def _finding(r: ChangeRegion) -> str:
    direction = "increased density" if r.kind == "increase" else "decreased density"
    return (f"present: {direction} in {r.zone} beyond normal variation, {r.area_mm2:.0f} mm2, longest diameter "
            f"{r.longest_diameter_mm:.0f} mm (confidence {r.confidence:.2f})")


def _summary(regions: list[ChangeRegion], n: int) -> str:
    against = f"against {n} normal reference(s) of other people, not the patient's prior"
    if not regions:
        return f"No region beyond normal variation ({against})."
    top = regions[0]
    return (f"{len(regions)} region(s) beyond normal variation ({against}); most prominent: {top.zone}, "
            f"{top.longest_diameter_mm:.0f} mm.")


def _done(result: ComparisonResult, t0: float) -> ComparisonResult:
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


__all__ = ["DESCRIPTOR_KIND", "compare_with_references", "descriptor", "descriptor_similarity"]
