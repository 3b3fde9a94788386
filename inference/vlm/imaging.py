"""Pixel preparation for the VLM: display windowing and same-coordinate crops of prior and current."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..types import ChangeRegion


def _plane(pixels: np.ndarray) -> np.ndarray:
    """2D plane of an image; a volume gives its middle slice (the VLM reads 2D images)."""
    a = np.asarray(pixels, dtype=np.float32)
    if a.ndim == 3:
        a = a[a.shape[0] // 2]
    if a.ndim != 2:
        raise ValueError(f"expected 2D image or 3D volume, got shape {a.shape}")
    return a


def to_display(pixels: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """uint8 (rows, cols) with a robust percentile window (ignores hot pixels and burnt-in labels)."""
    a = _plane(pixels)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    out = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return (out * 255.0 + 0.5).astype(np.uint8)


def rank_regions(regions: Sequence[ChangeRegion], k: int) -> list[ChangeRegion]:
    """The k most significant regions: largest area x |mean change| first (stable order on ties)."""
    order = sorted(enumerate(regions), key=lambda ir: (-(ir[1].area_mm2 * abs(ir[1].mean_change)), ir[0]))
    return [r for _, r in order[: max(0, k)]]


def square_box(bbox: tuple[int, int, int, int], shape: tuple[int, int], margin: float = 0.25, min_side: int = 16) -> tuple[int, int, int, int]:
    """bbox grown by `margin` on each side and squared, clipped to the image."""
    r0, c0, r1, c1 = bbox
    rows, cols = shape
    side = max(r1 - r0, c1 - c0, 1)
    side = min(max(int(round(side * (1 + 2 * margin))), min_side), rows, cols)
    rc, cc = (r0 + r1) / 2.0, (c0 + c1) / 2.0
    top = int(round(rc - side / 2.0))
    left = int(round(cc - side / 2.0))
    top = min(max(top, 0), rows - side)
    left = min(max(left, 0), cols - side)
    return top, left, top + side, left + side


def crop_pair(prior: np.ndarray, current: np.ndarray, bbox: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The same region from prior and current (prior registered onto the current grid), windowed
    together so that a density change stays visible as a brightness change between the two crops."""
    p, c = _plane(prior), _plane(current)
    box = square_box(bbox, c.shape)
    if p.shape != c.shape:
        # Not on one grid: map the box proportionally rather than crop the wrong place silently.
        sr, sc = p.shape[0] / c.shape[0], p.shape[1] / c.shape[1]
        pbox = square_box((int(box[0] * sr), int(box[1] * sc), int(box[2] * sr), int(box[3] * sc)), p.shape)
    else:
        pbox = box
    pc = p[pbox[0] : pbox[2], pbox[1] : pbox[3]]
    cc = c[box[0] : box[2], box[1] : box[3]]
    joint = to_display(np.concatenate([pc.ravel(), cc.ravel()])[None, :])[0]
    return joint[: pc.size].reshape(pc.shape), joint[pc.size :].reshape(cc.shape)
