"""Session fixtures: tiny random Gemma 3, Qwen2.5-VL and Qwen3-VL models (trained tiny tokenizer, random
weights) written as model-repository entries in a temp dir. Nothing downloaded or committed."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from inference.types import ChangeRegion, ImageInput

# torch and transformers are installed by scripts/setup.sh: a missing one must fail, not skip.
from inference.vlm import BackendOptions, load_model  # noqa: E402
from inference.vlm.tiny import write_tiny_model  # noqa: E402

FAMILIES = ("gemma3", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for fam in FAMILIES:
        write_tiny_model(root, fam)
    return root


@pytest.fixture(scope="session")
def torch_vlms(models_root):
    return {fam: load_model(f"tiny-{fam}", models_root, backend="torch") for fam in FAMILIES}


def chest(seed: int, when: dt.date, shape=(120, 100)) -> ImageInput:
    rng = np.random.default_rng(seed)
    px = rng.normal(100.0, 20.0, shape).astype(np.float32)
    return ImageInput(px, (0.3, 0.3), modality="CR", body_part="CHEST", view="PA", acquired_on=when, source=f"img{seed}")


@pytest.fixture
def pair():
    return chest(1, dt.date(2024, 1, 10)), chest(2, dt.date(2024, 3, 20))  # prior, current


@pytest.fixture
def regions():
    return [
        ChangeRegion("right lower zone", (70, 10, 100, 40), 420.0, 31.5, 0.42, "worsened", 0.9),
        ChangeRegion("left hilum", (40, 60, 52, 72), 60.0, 9.0, -0.15, "improved", 0.6),
        ChangeRegion("left upper zone", (5, 60, 10, 65), 5.0, 2.0, 0.05, "stable", 0.3),
    ]
