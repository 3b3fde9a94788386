"""Qwen3-VL: dynamic resolution (grid of 16 px patches, 2x2 merge), interleaved M-RoPE, and
DeepStack: features from early vision layers are added to the first LM layers' hidden states at
the image positions, so the encoder's output is the merged features *plus* one tensor per
DeepStack layer.

transformers 5.x's Qwen3VLProcessor requires a torchvision video processor, so the inputs are
built here from the PIL image processor and the tokenizer directly (as for Qwen2.5-VL).

The vision features travel between `vision_features` and `as_encoder_outputs` as one tensor
(n_image_tokens, (1 + n_deepstack) * hidden): the merged features first, then each DeepStack
layer's, concatenated on the last axis; one row per image placeholder token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
)

from ..prompting import ImageSlot
from .base import Adapter


class Qwen3VLAdapter(Adapter):
    family = "qwen3_vl"
    version = "qwen3_vl-1"
    model_class = Qwen3VLForConditionalGeneration
    end_of_turn_tokens = ("<|im_end|>", "<|endoftext|>")

    def _image_processor(self) -> Any:
        v = self.config.vision_config
        if (self.spec.weights_dir / "preprocessor_config.json").is_file():
            proc = Qwen2VLImageProcessorPil.from_pretrained(self.spec.weights_dir, local_files_only=True)
        else:
            # Qwen3-VL's published preprocessor: mean/std 0.5 (not Qwen2-VL's CLIP statistics).
            proc = Qwen2VLImageProcessorPil(
                patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
                image_mean=[0.5] * 3, image_std=[0.5] * 3,
            )
        return proc

    def _pixel_budget(self, role: str) -> dict[str, int]:
        # Full images up to image_size^2 pixels, crops up to crop_size^2 (dynamic resolution).
        side = self.spec.crop_size if role.endswith("_crop") else self.spec.image_size
        factor = self.image_processor.patch_size * self.image_processor.merge_size
        return {"max_pixels": max(side * side, factor * factor), "min_pixels": factor * factor}

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def _hidden(self) -> int:
        return int(self.config.text_config.hidden_size)

    def _image_ids(self, n_tokens: int) -> list[int]:
        c = self.config
        return [int(c.vision_start_token_id)] + [self.image_token_id] * n_tokens + [int(c.vision_end_token_id)]

    def _wrap_turn(self, body: list[int]) -> list[int]:
        # Qwen3-VL's chat template adds no default system turn (Qwen2.5-VL's does).
        return self._text_ids("<|im_start|>user\n") + body + self._text_ids("<|im_end|>\n<|im_start|>assistant\n")

    def _preprocess(self, slots: Sequence[ImageSlot]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        pvs, grids = [], []
        for s in slots:
            budget = self._pixel_budget(s.role)
            out = self.image_processor(
                [self._pil(s)], return_tensors="pt",
                size={"shortest_edge": budget["min_pixels"], "longest_edge": budget["max_pixels"]},
            )
            pvs.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        grid = torch.cat(grids).long()
        merge = self.image_processor.merge_size ** 2
        return torch.cat(pvs), grid, [int(g.prod()) // merge for g in grid]

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
