"""Small array helpers shared by the sanity gate, registration and change analysis."""

from __future__ import annotations

import math

import numpy as np


def block_mean(arr: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Downsample by integer factors per axis (mean of each block); trailing remainders are dropped.
    A box mean is also the cheapest correct anti-aliasing for a 2048 px radiograph."""
    if all(f == 1 for f in factors):
        return arr.astype(np.float32, copy=False)
    slices = tuple(slice(0, (s // f) * f) for s, f in zip(arr.shape, factors))
    a = arr[slices]
    shape = []
    for s, f in zip(a.shape, factors):
        shape += [s // f, f]
    out = a.reshape(shape).mean(axis=tuple(range(1, 2 * a.ndim, 2)), dtype=np.float32)
    return out.astype(np.float32, copy=False)


def factor_for(shape: tuple[int, ...], max_side: int) -> int:
    return max(1, math.ceil(max(shape) / max_side))


def robust_scale(a: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(a - median) / IQR, so exposures of different gain look alike."""
    v = a[mask] if mask is not None else a.ravel()
    if v.size > 200_000:
        v = v[:: v.size // 200_000]
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return ((a - med) / max(q3 - q1, 1e-6)).astype(np.float32)


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation over mask (all pixels if None)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    if a.size < 16:
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def fft_translation(fixed: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, float]:
    """Integer shift s (per axis) maximising correlation of fixed(x) with moving(x - s), and the NCC there.
    Same-shape inputs; cheap on the coarse grids used for initialisation and the flip check."""
    f = fixed - fixed.mean()
    m = moving - moving.mean()
    window = np.ones_like(f)
    for ax, n in enumerate(f.shape):
        w = np.hanning(n).astype(np.float32)
        window = window * w.reshape([-1 if i == ax else 1 for i in range(f.ndim)])
    big = [2 * n for n in f.shape]  # zero padding: linear, not circular, correlation
    axes = list(range(f.ndim))
    xc = np.fft.irfftn(np.fft.rfftn(f * window, big, axes=axes) * np.conj(np.fft.rfftn(m * window, big, axes=axes)),
                       big, axes=axes)
    idx = np.unravel_index(int(np.argmax(xc)), xc.shape)
    shift = np.array([i if i < n else i - 2 * n for i, n in zip(idx, f.shape)])
    return shift, ncc_shifted(fixed, moving, shift)


def ncc_shifted(fixed: np.ndarray, moving: np.ndarray, shift: np.ndarray) -> float:
    """NCC of fixed(x) and moving(x - shift) over their overlap."""
    fs, ms = [], []
    for s, n in zip(shift, fixed.shape):
        s = int(s)
        if abs(s) >= n:
            return 0.0
        fs.append(slice(max(0, s), n + min(0, s)))
        ms.append(slice(max(0, -s), n - max(0, s)))
    return ncc(fixed[tuple(fs)], moving[tuple(ms)])


def resize_to(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resize (used only on coarse grids)."""
    from scipy import ndimage

    zoom = [t / s for t, s in zip(shape, arr.shape)]
    out = ndimage.zoom(arr, zoom, order=1, grid_mode=True, mode="nearest")
    return out[tuple(slice(0, t) for t in shape)].astype(np.float32)
