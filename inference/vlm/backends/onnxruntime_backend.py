"""`onnxruntime`: the vision encoder (+ projector) as ONNX on ONNX Runtime (CPU provider here;
TensorRT / CUDA providers first where installed); the language model stays in torch and gets
the features as its image embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..engine import ensure_onnx
from ..errors import BackendUnavailableError
from ..onnx_export import INPUT_NAME, OUTPUT_NAME
from .base import VLMBackend

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _ort() -> Any:
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError as exc:
        raise BackendUnavailableError(f"the onnxruntime backend needs the onnxruntime package ({exc})") from None
    return onnxruntime


class OnnxRuntimeBackend(VLMBackend):
    name = "onnxruntime"

    def load(self) -> "OnnxRuntimeBackend":
        _ort()  # fail before loading weights
        return super().load()  # type: ignore[return-value]

    def _load_vision(self) -> None:
        ort = _ort()
        assert self.adapter is not None and self.model is not None
        path = ensure_onnx(self.spec, self.adapter, self.model)
        available = set(ort.get_available_providers())
        wanted = self.options.extra.get("providers") or PREFERRED_PROVIDERS
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Without the arena the CPU provider returns a run's scratch memory (GBs for 896 px
        # SigLIP attention) instead of keeping its high-water mark for the worker's lifetime.
        opts.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        self.images_per_run = self._images_per_run()

    def _images_per_run(self) -> int:
        if self.options.vision_batch:
            return self.options.vision_batch
        if self.providers[0] == "CPUExecutionProvider":
            return 1  # on a CPU scratch memory grows with the batch (~3.5 GB an 896 px image), speed does not
        return max((p.max_batch for p in self.spec.engine_profiles if p.name == "vision"), default=0) or 256

    def encode_images(self, pixel_values: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        assert self.model is not None
        x = pixel_values.to(torch.float32).cpu().numpy()
        runs = [
            self.session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + self.images_per_run]})[0]
            for i in range(0, len(x), self.images_per_run)
        ]
        return torch.from_numpy(np.concatenate(runs)).to(self.device, self.model.dtype)
