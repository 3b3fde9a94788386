"""Qwen3-VL: the Qwen2.5-VL input path (dynamic resolution, 2x2 merge, M-RoPE; inputs built from
the PIL image processor and the tokenizer, since transformers 5.x's processor needs torchvision),
plus DeepStack: features from early vision layers are added to the first LM layers' hidden states
at the image positions, so the encoder's output is the merged features *plus* one tensor per
DeepStack layer.

The vision features travel between `vision_features` and `as_encoder_outputs` as one tensor
(n_image_tokens, (1 + n_deepstack) * hidden): the merged features first, then each DeepStack
layer's, concatenated on the last axis; one row per image placeholder token."""

from __future__ import annotations

import torch
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen3_vl"
    version = "qwen3_vl-1"
    model_class = Qwen3VLForConditionalGeneration
    # Qwen3-VL's published preprocessor: mean/std 0.5 (not Qwen2-VL's CLIP statistics).
    default_image_norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}

    @property
    def _hidden(self) -> int:
        return int(self.config.text_config.hidden_size)

    def vision_features(self, model, pixel_values, grid):
        """(n_image_tokens, (1 + n_deepstack) * hidden): merged features, then each DeepStack layer's."""
        pixel_values = pixel_values.to(model.device, model.dtype)
        out = model.model.get_image_features(pixel_values, grid.to(model.device), return_dict=True)
        main = torch.cat(list(out.pooler_output))
        deep = [torch.cat(list(f)) for f in (out.deepstack_features or [])]
        return torch.cat([main, *deep], dim=-1)

    def as_encoder_outputs(self, features, grid):
        sizes = (grid.prod(-1) // self.image_processor.merge_size**2).tolist()
        h = self._hidden
        if features.shape[-1] % h:
            raise ValueError(f"qwen3_vl features of width {features.shape[-1]} are not a multiple of hidden size {h}")
        main, *deep = torch.split(features, h, dim=-1)
        return {
            "image": BaseModelOutputWithDeepstackFeatures(
                pooler_output=torch.split(main, sizes),
                deepstack_features=[torch.split(d, sizes) for d in deep],
            )
        }
