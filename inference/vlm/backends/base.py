"""One backend interface: load, warm up, run a batch.

Every backend runs the same adapter; they differ in who runs the vision encoder (torch,
ONNX Runtime, TensorRT) and how the language model decodes (eager / static cache + compile).
The language model always receives the encoder's features through `mm_encoder_outputs`,
which `generate` scatters into `inputs_embeds` at the image placeholder tokens."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

import torch

from ..adapters import Adapter, make_adapter
from ..prompting import Prompt
from ..spec import ModelSpec
from .options import BackendOptions, Timings

log = logging.getLogger(__name__)


class VLMBackend:
    name = "base"

    def __init__(self, spec: ModelSpec, options: BackendOptions | None = None):
        self.spec = spec
        self.options = options or BackendOptions()
        self.adapter: Adapter | None = None
        self.model: torch.nn.Module | None = None
        self.last = Timings()
        self._lock = threading.Lock()  # one batch at a time on one model

    # --- lifecycle ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        d = self.options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(d)

    def _dtype(self) -> str:
        dt = self.options.dtype or self.spec.dtype
        if self.device.type == "cpu" and dt != "float32" and self.options.dtype is None:
            dt = "float32"  # CPU half-precision matmuls are slow and not what production runs
        return dt

    def load(self) -> "VLMBackend":
        if self.model is None:
            self.adapter = make_adapter(self.spec)
            self.model = self.adapter.load_model(self.device, self._dtype())
            self._load_vision()
        return self

    def adopt(self, adapter: Adapter, model: torch.nn.Module) -> "VLMBackend":
        """Serve an already loaded model (switching backends without re-reading the weights)."""
        self.adapter, self.model = adapter, model
        self._load_vision()
        return self

    def _load_vision(self) -> None:
        """Prepare the vision encoder runner (torch needs nothing)."""

    def language_model_compiler(self) -> str:
        """What runs the language model's decode step (reported by the benchmark)."""
        return "torch eager"

    def warm_up(self, prompt: Prompt) -> None:
        """One short generation so that lazy init / compilation happens before real traffic."""
        self.run_batch([prompt], max_new_tokens=2)

    # --- the batch -----------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, grid: torch.Tensor | None) -> Any:
        assert self.adapter is not None and self.model is not None
        with torch.inference_mode():
            return self.adapter.vision_features(self.model, pixel_values, grid)

    def _generate_kwargs(self, batch_size: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
        return {}

    def _pad_multiple(self) -> int:
        return 1

    def run_batch(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None, ignore_eos: bool = False) -> list[str]:
        """Generated text per prompt, in order (greedy; EOS ignored for benchmarking only)."""
        self.load()
        ad, model = self.adapter, self.model
        assert ad is not None and model is not None
        n_new = max_new_tokens or self.spec.max_new_tokens
        with self._lock, torch.inference_mode():
            batch = ad.collate([ad.encode(p) for p in prompts], pad_to_multiple=self._pad_multiple())
            t0 = time.perf_counter()
            feats = self.encode_images(batch.pixel_values, batch.image_grid_thw)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            kw = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.generate_kwargs.items()}
            out = model.generate(
                **kw,
                mm_encoder_outputs=ad.as_encoder_outputs(feats, batch.image_grid_thw),
                max_new_tokens=n_new,
                min_new_tokens=n_new if ignore_eos else None,
                do_sample=False,
                eos_token_id=ad.eos_token_ids(),
                pad_token_id=ad.pad_token_id,
                **self._generate_kwargs(len(prompts), batch.prompt_len, n_new),
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
        new = out[:, batch.prompt_len :]
        self.last = Timings(t1 - t0, t2 - t1, int(new.shape[1]))
        return [ad.decode(row) for row in new]
