"""An image descriptor from the configured model's own vision encoder, for matching normal references.

The research behind reference-guided comparison matched references to the query by image-embedding
similarity, among others. Where the node runs a local model (weights on disk), its vision encoder
and projector give that embedding: the image goes through the model's own preprocessing, and the
image tokens the language model would see are averaged into one vector (zero mean, unit norm, so
that descriptors compare by NCC like the thumbnail). Only the vision part is kept in memory. The
kind names the model and a fingerprint of its weights: descriptors of another model or of changed
weights are never compared with these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..types import ImageInput
from .imaging import to_display
from .prompting import ImageSlot
from .spec import ModelSpec


class VisionEncoderDescriptor:
    def __init__(self, spec: ModelSpec) -> None:
        import torch

        from .adapters import make_adapter
        from .engine import weights_fingerprint

        self._torch = torch
        self.adapter = make_adapter(spec)
        # Loaded at the width the weights are stored in (bfloat16 for most checkpoints: half the
        # memory of loading the whole model as float32), then the vision part alone is widened to
        # float32: the same values as a float32 load, since widening is exact.
        weights = spec.require_weights()
        self.model = self.adapter.load_model("cpu", stored_dtype(weights))
        # The language model is not needed for an embedding: release it.
        inner = getattr(self.model, "model", None)
        if inner is not None and hasattr(inner, "language_model"):
            inner.language_model = None
        if hasattr(self.model, "lm_head"):
            self.model.lm_head = None
        self.model.float()
        self.kind = f"vision:{spec.name}:{self.adapter.version}:{weights_fingerprint(weights)[:12]}"

    def __call__(self, image: ImageInput) -> np.ndarray:
        pixels = image.pixels if image.pixels.ndim == 2 else image.pixels[image.pixels.shape[0] // 2]
        pixel_values, grid, _ = self.adapter._preprocess([ImageSlot(to_display(pixels), "current")])
        with self._torch.inference_mode():
            features = self.adapter.vision_features(self.model, pixel_values, grid)
        tokens = features.float().reshape(-1, features.shape[-1]).cpu().numpy()
        vector = tokens.mean(axis=0).astype(np.float32)
        vector -= vector.mean()
        return vector / max(float(np.linalg.norm(vector)), 1e-9)


_HALF_TYPES = {"BF16": "bfloat16", "F16": "float16"}


def stored_dtype(weights_dir: Path) -> str:
    """The narrowest dtype that holds every floating tensor of the checkpoint exactly: its half
    type when all are stored in that one, else float32 (safetensors headers only: no weights read)."""
    from safetensors import safe_open

    kinds = set()
    for path in sorted(Path(weights_dir).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                kind = f.get_slice(key).get_dtype()
                if kind.startswith(("F", "BF")):
                    kinds.add(kind)
    if len(kinds) == 1:
        [kind] = kinds
        return _HALF_TYPES.get(kind, "float32")
    return "float32"

