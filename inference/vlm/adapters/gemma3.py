"""Gemma 3 / MedGemma: SigLIP encoder at a fixed square size, 256 (config) soft tokens per image."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import Gemma3ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from ..prompting import ImageSlot
from .base import Adapter


class _VisionExport(torch.nn.Module):
    def __init__(self, model: Gemma3ForConditionalGeneration):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision_tower(pixel_values=pixel_values).last_hidden_state)


class Gemma3Adapter(Adapter):
    family = "gemma3"
    version = "gemma3-1"
    model_class = Gemma3ForConditionalGeneration
    end_of_turn_tokens = ("<end_of_turn>",)
    mm_type_key = "token_type_ids"  # Gemma 3: bidirectional attention inside each image block

    def _image_processor(self) -> Any:
        side = int(self.config.vision_config.image_size)
        if (self.spec.weights_dir / "preprocessor_config.json").is_file():
            proc = Gemma3ImageProcessorPil.from_pretrained(self.spec.weights_dir, local_files_only=True)
        else:
            proc = Gemma3ImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
        proc.size = {"height": side, "width": side}  # the encoder's input size is fixed by its config
        proc.do_pan_and_scan = False
        return proc

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = int(self.config.vision_config.image_size)
        return (3, s, s)

    def _image_ids(self, n_tokens: int) -> list[int]:
        nl = self._text_ids("\n\n")
        return nl + [int(self.config.boi_token_index)] + [self.image_token_id] * n_tokens + [int(self.config.eoi_token_index)] + nl

    def _wrap_turn(self, body: list[int]) -> list[int]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self._text_ids("<start_of_turn>user\n") + body + self._text_ids("<end_of_turn>\n<start_of_turn>model\n")

    def _preprocess(self, slots: Sequence[ImageSlot]) -> tuple[torch.Tensor, None, list[int]]:
        pv = self.image_processor([self._pil(s) for s in slots], return_tensors="pt")["pixel_values"]
        return pv, None, [int(self.config.mm_tokens_per_image)] * len(slots)

    def vision_features(self, model, pixel_values, grid=None) -> torch.Tensor:
        pixel_values = pixel_values.to(model.device, model.dtype)
        return model.model.get_image_features(pixel_values, return_dict=True).pooler_output

    def as_encoder_outputs(self, features, grid=None):
        return {"image": BaseModelOutputWithPooling(pooler_output=features)}

    def export_module(self, model):
        return _VisionExport(model).eval()
