"""`onnxruntime`: the vision encoder (+ projector) as ONNX on ONNX Runtime (CPU provider here;
TensorRT / CUDA providers first where installed); the language model stays in torch and gets
the features as its image embeddings."""

from __future__ import annotations

from typing import Any

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
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()

    def encode_images(self, pixel_values: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        assert self.model is not None
        x = pixel_values.to(torch.float32).cpu().numpy()
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return torch.from_numpy(out).to(self.device, self.model.dtype)
