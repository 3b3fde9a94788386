"""One interface over model families: prompt layout, image preprocessing, and the split
between vision encoder (exportable / replaceable by ONNX Runtime or TensorRT) and the
language model (fed the encoder's features through `mm_encoder_outputs`)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import ModelNotFoundError
from ..prompting import ImageSlot, Prompt
from ..spec import ModelSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def offline() -> None:
    """Never touch the Hub: every load is from a local directory."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@dataclass
class Encoded:
    """One request, tokenised: ids with image placeholders and the preprocessed images."""

    input_ids: list[int]
    pixel_values: torch.Tensor  # gemma3: (n_images, 3, S, S); qwen: (n_patches, patch_dim)
    image_grid_thw: torch.Tensor | None  # qwen only: (n_images, 3)
    image_token_mask: list[int]  # 1 where input_ids is an image placeholder


@dataclass
class Batch:
    """Left-padded requests ready for `generate`; pixel tensors concatenated in request order."""

    generate_kwargs: dict[str, Any]  # input_ids, attention_mask, and family-specific ids/grids
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor | None
    prompt_len: int


class Adapter(ABC):
    family: str = ""
    version: str = ""  # bump when layout / preprocessing / export changes (engine cache key)
    model_class: type

    def __init__(self, spec: ModelSpec):
        offline()
        self.spec = spec
        wdir = spec.require_weights()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(wdir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"model {spec.name!r}: cannot load tokenizer from {wdir}: {exc}") from exc
        self.config = self.model_class.config_class.from_pretrained(wdir, local_files_only=True)
        self.image_processor = self._image_processor()

    # --- loading -----------------------------------------------------------------------
    def load_model(self, device: str | torch.device = "cpu", dtype: str | None = None) -> torch.nn.Module:
        td = TORCH_DTYPES[dtype or self.spec.dtype]
        model = self.model_class.from_pretrained(
            self.spec.weights_dir, local_files_only=True, dtype=td, attn_implementation="sdpa"
        )
        return model.to(device).eval()

    @abstractmethod
    def _image_processor(self) -> Any: ...

    # --- prompt layout -----------------------------------------------------------------
    @abstractmethod
    def _image_ids(self, n_tokens: int) -> list[int]: ...

    @abstractmethod
    def _wrap_turn(self, body: list[int]) -> list[int]: ...

    @abstractmethod
    def _preprocess(self, slots: Sequence[ImageSlot]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """pixel tensor, grid (qwen) and placeholder-token count per image."""

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _pil(self, slot: ImageSlot) -> Image.Image:
        img = Image.fromarray(np.ascontiguousarray(slot.pixels, dtype=np.uint8), mode="L")
        if slot.role.endswith("_crop"):
            # Zoom: the crop fills the encoder's input rather than being a few patches.
            img = img.resize((self.spec.crop_size, self.spec.crop_size), Image.BICUBIC)
        return img.convert("RGB")

    def encode(self, prompt: Prompt) -> Encoded:
        pixel_values, grid, counts = self._preprocess(prompt.images)
        body: list[int] = []
        mask: list[int] = []
        k = 0
        for part in prompt.parts:
            if isinstance(part, str):
                ids = self._text_ids(part + "\n")
            else:
                ids = self._image_ids(counts[k])
                k += 1
            body += ids
        ids = self._wrap_turn(body)
        image_id = self.image_token_id
        mask = [1 if t == image_id else 0 for t in ids]
        return Encoded(ids, pixel_values, grid, mask)

    # --- batching ----------------------------------------------------------------------
    @property
    @abstractmethod
    def image_token_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return pid if pid is not None else (self.tokenizer.eos_token_id or 0)

    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in self.end_of_turn_tokens:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)

    end_of_turn_tokens: tuple[str, ...] = ()
    mm_type_key = "mm_token_type_ids"

    def collate(self, items: Sequence[Encoded], pad_to_multiple: int = 1) -> Batch:
        n = max(len(e.input_ids) for e in items)
        n = -(-n // pad_to_multiple) * pad_to_multiple
        pad = self.pad_token_id
        ids = torch.tensor([[pad] * (n - len(e.input_ids)) + e.input_ids for e in items], dtype=torch.long)
        att = torch.tensor([[0] * (n - len(e.input_ids)) + [1] * len(e.input_ids) for e in items], dtype=torch.long)
        mm = torch.tensor([[0] * (n - len(e.input_ids)) + e.image_token_mask for e in items], dtype=torch.long)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": att, self.mm_type_key: mm}
        grids = [e.image_grid_thw for e in items if e.image_grid_thw is not None]
        grid = torch.cat(grids) if grids else None
        if grid is not None:
            kwargs["image_grid_thw"] = grid
        return Batch(kwargs, torch.cat([e.pixel_values for e in items]), grid, n)

    # --- vision encoder split ------------------------------------------------------------
    @abstractmethod
    def vision_features(self, model: torch.nn.Module, pixel_values: torch.Tensor, grid: torch.Tensor | None) -> Any:
        """Torch reference of the vision encoder + projector."""

    @abstractmethod
    def as_encoder_outputs(self, features: Any, grid: torch.Tensor | None) -> dict[str, BaseModelOutputWithPooling]:
        """Features in the form `generate(mm_encoder_outputs=...)` expects for this family."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Fixed per-image encoder input (C, H, W); only static-resolution families have one."""
        raise NotImplementedError(f"family {self.family!r} has dynamic resolution, no fixed vision input shape")

    def export_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """Vision encoder + projector as one module `pixel_values -> features` for ONNX export."""
        raise NotImplementedError(f"family {self.family!r} has no static-shape vision export")

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
