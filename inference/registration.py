"""Prior onto current with SimpleITK: rigid/similarity then affine for radiographs, rigid for volumes,
optionally a coarse B-spline step. Reports NCC before and after, and whether to trust the result.

Initialisation is a coarse FFT cross-correlation (robust to large shifts that
gradient descent would miss); the metric is Mattes mutual information, which
tolerates the non-linear exposure differences between two radiographs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .imageops import block_mean, factor_for, fft_translation, ncc, robust_scale
from .types import RegistrationQuality

NCC_MIN_AFTER = 0.6  # below this the images do not depict the same anatomy well enough to subtract
MIN_OVERLAP = 0.5  # fraction of the current image the registered prior must cover
_COARSE_MM = 4.0
REG_MAX_SIDE = 256
_START_ANGLES = (-6.0, -3.0, 0.0, 3.0, 6.0)
REG_MAX_SIDE_3D = 96  # rigid 3D needs few voxels; in-plane detail beyond this only costs time
_SEED = 20240601  # fixed sampling seed: the same inputs always give the same registration


@dataclass
class Registered:
    warped: np.ndarray  # prior resampled onto the current grid (float32)
    valid: np.ndarray  # bool: where the warped prior has data
    quality: RegistrationQuality
    transform: object = None  # SimpleITK transform: fixed physical point -> moving physical point

    def to_moving(self, points: np.ndarray, fixed_spacing: tuple[float, ...],
                  moving_spacing: tuple[float, ...]) -> np.ndarray:
        """Fixed-grid indices (N, dim) in numpy order -> moving-grid indices (both grids start at 0 mm).
        Used to draw a finding measured on the registered prior on the prior's own image."""
        if self.transform is None:
            return np.asarray(points, float)
        fs, ms = np.asarray(fixed_spacing, float), np.asarray(moving_spacing, float)
        out = []
        for p in np.asarray(points, float):
            phys = self.transform.TransformPoint(tuple(float(v) for v in (p * fs)[::-1]))  # SimpleITK is x, y(, z)
            out.append(np.asarray(phys)[::-1] / ms)
        return np.array(out).reshape(-1, len(fs))


def register(fixed: np.ndarray, fixed_spacing: tuple[float, ...], moving: np.ndarray,
             moving_spacing: tuple[float, ...], *, deformable: bool = False, threads: int = 2) -> Registered:
    """Register `moving` (prior) onto `fixed` (current); arrays in numpy (z,)y,x order, spacing likewise."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    dim = fixed.ndim
    # Optimise on a grid of at most REG_MAX_SIDE px (the transform is physical, so it applies at any grid).
    side = REG_MAX_SIDE if dim == 2 else REG_MAX_SIDE_3D
    ff = tuple(factor_for(fixed.shape[-2:], side) if ax >= dim - 2 else 1 for ax in range(dim))
    mf = tuple(factor_for(moving.shape[-2:], side) if ax >= dim - 2 else 1 for ax in range(dim))
    f_img = _to_sitk(robust_scale(block_mean(fixed, ff)), tuple(s * k for s, k in zip(fixed_spacing, ff)))
    m_img = _to_sitk(robust_scale(block_mean(moving, mf)), tuple(s * k for s, k in zip(moving_spacing, mf)))
    f_full = _to_sitk(fixed, fixed_spacing)
    centring = sitk.TranslationTransform(dim, _centre(m_img) - _centre(f_img))

    # Coarse FFT translation on a common grid around the current's extent.
    coarse = _grid_like(f_img, _COARSE_MM)
    fc = sitk.GetArrayFromImage(sitk.Resample(f_img, coarse, sitk.Transform(dim, sitk.sitkIdentity),
                                              sitk.sitkLinear, 0.0))
    mc = sitk.GetArrayFromImage(sitk.Resample(m_img, coarse, centring, sitk.sitkLinear, 0.0))
    # Gradient descent from zero rotation can settle a few degrees off (a rotated rib cage offers
    # many local minima), so the start angle is searched too, in-plane.
    best = (-2.0, np.zeros(dim, int), 0.0)
    for angle in _START_ANGLES:
        rotated = mc if angle == 0 else _rotate_inplane(mc, angle)
        shift, score = fft_translation(fc, rotated)
        if score > best[0]:
            best = (score, shift, angle)
    _, shift, angle = best
    t0 = _centre(m_img) - _centre(f_img) - shift[::-1].astype(float) * _COARSE_MM

    if dim == 2:
        rigid = sitk.Similarity2DTransform()
        rigid.SetAngle(-np.deg2rad(angle))
    else:
        rigid = sitk.Euler3DTransform()
        rigid.SetRotation(0.0, 0.0, -np.deg2rad(angle))
    rigid.SetCenter(tuple(_centre(f_img)))
    rigid.SetTranslation(tuple(t0))
    rigid = _run(f_img, m_img, rigid, shrink=[4, 2, 1], sigmas=[2, 1, 0], iterations=60)
    final: sitk.Transform = rigid
    name = "similarity" if dim == 2 else "rigid"
    if dim == 2:
        affine = sitk.AffineTransform(2)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        affine = _run(f_img, m_img, affine, shrink=[2, 1], sigmas=[1, 0], iterations=40, learning_rate=0.5)
        # The affine step only refines; if it wandered off (shear fits a rib cage surprisingly well
        # at coarse scale), the similarity result stands.
        if _score(f_img, m_img, affine) >= _score(f_img, m_img, rigid) - 1e-4:
            final = affine
            name += "+affine"
        if deformable:
            final = _bspline(f_img, m_img, final)
            name += "+bspline"

    m_full = _to_sitk(moving, moving_spacing)
    warped = sitk.GetArrayFromImage(sitk.Resample(m_full, f_full, final, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ones = sitk.Image(m_full.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(m_full)
    valid = sitk.GetArrayFromImage(sitk.Resample(ones, f_full, final, sitk.sitkNearestNeighbor, 0)) > 0
    # "Before" is the prior as stored, centred on the current: what a reader would overlay by hand.
    before = sitk.GetArrayFromImage(sitk.Resample(m_img, f_img, centring, sitk.sitkLinear, 0.0))
    valid_before = sitk.GetArrayFromImage(sitk.Resample(ones, f_img, centring, sitk.sitkNearestNeighbor, 0)) > 0
    ncc_before = ncc(sitk.GetArrayFromImage(f_img), before, valid_before) if valid_before.any() else 0.0
    ncc_after = ncc(fixed, warped, valid) if valid.any() else 0.0
    overlap = float(valid.mean())
    ok = ncc_after >= NCC_MIN_AFTER and ncc_after >= ncc_before - 0.02 and overlap >= MIN_OVERLAP
    desc = f"{name}; {_describe(final, dim)}; overlap {overlap:.0%}"
    return Registered(warped.astype(np.float32), valid,
                      RegistrationQuality(round(ncc_before, 4), round(ncc_after, 4), bool(ok), desc), final)


def _rotate_inplane(a: np.ndarray, angle_deg: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.rotate(a, angle_deg, axes=(a.ndim - 1, a.ndim - 2), reshape=False, order=1)


def _to_sitk(arr: np.ndarray, spacing: tuple[float, ...]):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK is x, y(, z)
    return img


def _centre(img) -> np.ndarray:
    size = np.array(img.GetSize(), float)
    return np.array(img.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))


def _grid_like(img, spacing_mm: float):
    import SimpleITK as sitk

    extent = np.array(img.GetSize()) * np.array(img.GetSpacing())
    size = [max(8, int(round(e / spacing_mm))) for e in extent]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * img.GetDimension())
    ref.SetOrigin(img.GetOrigin())
    return ref


def _score(f_img, m_img, transform) -> float:
    import SimpleITK as sitk

    warped = sitk.GetArrayFromImage(sitk.Resample(m_img, f_img, transform, sitk.sitkLinear, np.nan))
    ok = np.isfinite(warped)
    return ncc(sitk.GetArrayFromImage(f_img), np.nan_to_num(warped), ok) if ok.any() else -1.0


def _run(f_img, m_img, transform, *, shrink, sigmas, iterations, learning_rate=2.0):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.15, _SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(f_img, m_img)
    return transform


def _bspline(f_img, m_img, affine):
    """A coarse (4x4 mesh) B-spline on top of the affine: breathing and positioning, not lesions."""
    import SimpleITK as sitk

    bs = sitk.BSplineTransformInitializer(f_img, [4] * f_img.GetDimension(), order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, _SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=30)
    reg.SetShrinkFactorsPerLevel([2])
    reg.SetSmoothingSigmasPerLevel([1])
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bs, inPlace=True)
    reg.Execute(f_img, m_img)
    return sitk.CompositeTransform([affine, bs])  # applied bspline first, then affine: affine(bspline(x))


def _describe(t, dim: int) -> str:
    try:
        import SimpleITK as sitk

        base = t if not isinstance(t, sitk.CompositeTransform) else t.GetNthTransform(0)
        params = base.GetParameters()
        trans = params[-dim:]
        return "translation " + ",".join(f"{v:.1f}" for v in trans) + " mm"
    except Exception:  # description only; never fail a registration over it
        return ""
