"""Heat-map overlay of the change on the current image, for human review."""

from __future__ import annotations

import os

import numpy as np

from .types import ComparisonResult

_INCREASE = np.array([255, 48, 32], np.float32)  # denser now: red
_DECREASE = np.array([32, 128, 255], np.float32)  # less dense now: blue
_BOX = np.array([255, 220, 0], np.uint8)


def make_overlay(image: np.ndarray, z: np.ndarray, analysed: np.ndarray,
                 boxes: list[tuple[int, ...]]) -> np.ndarray:
    """RGB uint8: the image in grey, change in colour with opacity growing with significance,
    region boxes in yellow. All inputs on the same (analysis) grid."""
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None] * 255.0
    rgb = np.repeat(grey, 3, axis=2)
    alpha = (np.clip((np.abs(z) - 2.0) / 8.0, 0, 0.75) * analysed)[..., None]
    colour = np.where((z > 0)[..., None], _INCREASE, _DECREASE)
    rgb = rgb * (1 - alpha) + colour * alpha
    out = np.clip(rgb, 0, 255).astype(np.uint8)
    rows, cols = image.shape
    for r0, c0, r1, c1 in boxes:
        r0, r1 = max(0, r0 - 2), min(rows - 1, r1 + 1)
        c0, c1 = max(0, c0 - 2), min(cols - 1, c1 + 1)
        out[r0, c0:c1 + 1] = _BOX
        out[r1, c0:c1 + 1] = _BOX
        out[r0:r1 + 1, c0] = _BOX
        out[r0:r1 + 1, c1] = _BOX
    return out


def save_overlay_png(result: ComparisonResult, path: str | os.PathLike) -> None:
    """Write the result's overlay as PNG. Raises ValueError when the comparison produced none
    (no prior, refused pair, failed registration)."""
    from PIL import Image

    if result.overlay is None:
        raise ValueError(f"no overlay to write to {path}: {result.summary or 'comparison produced no image'}")
    Image.fromarray(np.ascontiguousarray(result.overlay, dtype=np.uint8)).save(str(path), format="PNG")
