"""Qwen2.5-VL: dynamic resolution (grid of 14 px patches, 2x2 merge), M-RoPE positions.

transformers 5.x's Qwen2_5_VLProcessor requires a torchvision video processor, so the inputs
are built here from the PIL image processor and the tokenizer directly."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..prompting import ImageSlot
from .base import Adapter


class Qwen2_5_VLAdapter(Adapter):
    family = "qwen2_5_vl"
    version = "qwen2_5_vl-1"
    model_class = Qwen2_5_VLForConditionalGeneration
    end_of_turn_tokens = ("<|im_end|>", "<|endoftext|>")
    # Normalisation when the weights carry no preprocessor_config.json (the processor's default: CLIP's).
    default_image_norm: dict[str, list[float]] = {}

    def _image_processor(self) -> Any:
        v = self.config.vision_config
        if (self.spec.weights_dir / "preprocessor_config.json").is_file():
            proc = Qwen2VLImageProcessorPil.from_pretrained(self.spec.weights_dir, local_files_only=True)
        else:
            proc = Qwen2VLImageProcessorPil(
                patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
                **self.default_image_norm,
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

    def _image_ids(self, n_tokens: int) -> list[int]:
        c = self.config
        return [int(c.vision_start_token_id)] + [self.image_token_id] * n_tokens + [int(c.vision_end_token_id)]

    def _wrap_turn(self, body: list[int]) -> list[int]:
        return self._text_ids("<|im_start|>user\n") + body + self._text_ids("<|im_end|>\n<|im_start|>assistant\n")

    def _preprocess(self, slots: Sequence[ImageSlot]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        pvs, grids = [], []
        for s in slots:
            budget = self._pixel_budget(s.role)
            out = self.image_processor(
                [self._pil(s)], return_tensors="pt", size={"shortest_edge": budget["min_pixels"], "longest_edge": budget["max_pixels"]}
            )
            pvs.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        grid = torch.cat(grids).long()
        merge = self.image_processor.merge_size ** 2
        return torch.cat(pvs), grid, [int(g.prod()) // merge for g in grid]

    def vision_features(self, model, pixel_values, grid):
        pixel_values = pixel_values.to(model.device, model.dtype)
        out = model.model.get_image_features(pixel_values, grid.to(model.device), return_dict=True).pooler_output
        return torch.cat(list(out))

    def as_encoder_outputs(self, features, grid):
        sizes = (grid.prod(-1) // self.image_processor.merge_size**2).tolist()
        return {"image": BaseModelOutputWithPooling(pooler_output=torch.split(features, sizes))}
