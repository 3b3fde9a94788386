from __future__ import annotations

import pytest

from inference.phantoms import make_chest_pair
from inference.pixels import image_from_dataset

SIZE = 384  # small enough for a fast suite, analysed at full resolution (1.1 mm pixels)


def chest_images(seed: int, change: str, **kw):
    pair = make_chest_pair(seed, change, kw.pop("size", SIZE), **kw)
    return (image_from_dataset(pair.current, f"current-{seed}.dcm"),
            image_from_dataset(pair.prior, f"prior-{seed}.dcm"), pair.truth)


@pytest.fixture(scope="session")
def new_nodule_case():
    return chest_images(7, "new_nodule", lesion_size_mm=16.0)


@pytest.fixture(scope="session")
def stable_case():
    return chest_images(11, "stable")
