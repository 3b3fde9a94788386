"""Coarse anatomical zones from image geometry.

Chest radiographs (frontal): the lungs are the dark regions inside the body that
do not touch the image border; each lung's height from apex to costophrenic
angle is split into upper / middle / lower thirds, and what lies between the
lungs' medial edges is the cardiac/mediastinal region. The patient's right is
on the image left in standard PA/AP display. Other images get a plain
description of where in the image the region lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_THIRDS = ("upper", "middle", "lower")


@dataclass(frozen=True)
class ChestGeometry:
    top: float  # row of the lung apices
    bottom: float  # row of the costophrenic angles
    right_medial: float  # column of the right lung's medial edge (image left lung)
    left_medial: float  # column of the left lung's medial edge
    midline: float
    segmented: bool  # False: a geometric fallback was used


def chest_geometry(images: list[np.ndarray]) -> ChestGeometry:
    """Lung geometry from one or more co-registered frontal chest images (union of their lung masks,
    so that an effusion in one time point does not shrink the lung outline)."""
    from scipy import ndimage

    n_rows, n_cols = images[0].shape
    lungs = np.zeros(images[0].shape, bool)
    for img in images:
        lungs |= _lung_mask(img)
    lab, n = ndimage.label(lungs)
    if n >= 2:
        sizes = ndimage.sum(lungs, lab, range(1, n + 1))
        order = np.argsort(sizes)[::-1][:2]
        if sizes[order[1]] > 0.01 * lungs.size:
            masks = [lab == (i + 1) for i in order]
            cols = [np.nonzero(m)[1] for m in masks]
            right, left = sorted(range(2), key=lambda i: cols[i].mean())
            rows = np.concatenate([np.nonzero(m)[0] for m in masks])
            rm, lm = np.percentile(cols[right], 97), np.percentile(cols[left], 3)
            if rm < lm:
                return ChestGeometry(float(np.percentile(rows, 1)), float(np.percentile(rows, 99)),
                                     float(rm), float(lm), float((rm + lm) / 2), True)
    # Fallback: typical proportions of a frontal chest film.
    return ChestGeometry(0.1 * n_rows, 0.72 * n_rows, 0.45 * n_cols, 0.55 * n_cols, 0.5 * n_cols, False)


def _lung_mask(img: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    sm = ndimage.gaussian_filter(img.astype(np.float32), 2)
    t = _otsu(sm)
    dark = sm < t
    # Within the dark class, air outside the body is darker than lung: split again inside it.
    lab, n = ndimage.label(dark)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
    interior = dark & ~np.isin(lab, list(border))
    if interior.sum() < 0.02 * img.size:
        # Lungs connected to outside air through the dark class: split the dark class itself.
        t2 = _otsu(sm[dark]) if dark.any() else t
        dark = (sm < t) & (sm > t2)
        lab, n = ndimage.label(ndimage.binary_opening(dark, iterations=2))
        border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
        interior = (lab > 0) & ~np.isin(lab, list(border))
    return ndimage.binary_fill_holes(ndimage.binary_opening(interior, iterations=2))


def _otsu(values: np.ndarray) -> float:
    v = values.ravel()
    if v.size > 200_000:
        v = v[:: v.size // 200_000]
    hist, edges = np.histogram(v, bins=256)
    p = hist.astype(float) / max(1, hist.sum())
    w = np.cumsum(p)
    mu = np.cumsum(p * (edges[:-1] + edges[1:]) / 2)
    mt = mu[-1]
    between = (mt * w - mu) ** 2 / np.maximum(w * (1 - w), 1e-12)
    return float(edges[int(np.argmax(between)) + 1])


def chest_zone(geo: ChestGeometry, row: float, col: float, view: str = "PA") -> str:
    vertical = _THIRDS[int(np.clip((row - geo.top) / max(geo.bottom - geo.top, 1.0) * 3, 0, 2))]
    if view.upper() in ("LAT", "LL", "RL", "LATERAL"):
        return f"{vertical} zone"
    if geo.right_medial < col < geo.left_medial and row > geo.top + 0.25 * (geo.bottom - geo.top):
        return "cardiac/mediastinal"
    side = "right" if col < geo.midline else "left"
    return f"{side} {vertical} zone"


def image_region(shape: tuple[int, int], row: float, col: float) -> str:
    """Non-chest images: where in the displayed image, in plain words."""
    v = ("upper", "central", "lower")[int(np.clip(row / shape[0] * 3, 0, 2))]
    h = ("left", "central", "right")[int(np.clip(col / shape[1] * 3, 0, 2))]
    return f"image {v}-{h}" if (v, h) != ("central", "central") else "image centre"


def volume_zone(shape: tuple[int, int, int], body_centre_col: float, z: float, row: float, col: float,
                is_chest: bool) -> str:
    """Axial volumes: side from the body's centre column (patient right on image left), level by thirds."""
    level = ("superior", "mid", "inferior")[int(np.clip((shape[0] - 1 - z) / shape[0] * 3, 0, 2))]
    side = "right" if col < body_centre_col else "left"
    organ = "lung" if is_chest else "side"
    return f"{side} {organ}, {level} third"
