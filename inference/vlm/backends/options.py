"""Backend options and timings: plain data, importable without torch (the `openai` backend uses them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServerOptions:
    """An OpenAI-compatible model server (vLLM, SGLang, TensorRT-LLM / NIM, `transformers serve`)."""

    base_url: str  # up to and including /v1, e.g. http://model-server:8000/v1
    served_model: str = ""  # the name the server serves; empty: the model.yaml name
    api_key: str = field(default="", repr=False)  # never logged (repr hides it)
    timeout_s: float = 120.0  # one request, connect to last byte
    max_concurrency: int = 8  # requests in flight at once from this process


@dataclass
class BackendOptions:
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: the model.yaml dtype (float32 forced on CPU for half types)
    compile_backend: str = "inductor"  # torch.compile backend for torch-compile / tensorrt LM
    compile_mode: str | None = None  # None: reduce-overhead (CUDA graphs) on GPU, default on CPU
    pad_to_multiple: int = 128  # prompt-length bucket so static-cache shapes repeat (compile)
    fallback: str | None = None  # backend to use when this one is unavailable here (tensorrt)
    on_engine_mismatch: str = "rebuild"  # "rebuild" | "refuse" a missing/incompatible engine
    vision_batch: int | None = None  # images per vision-encoder run (onnxruntime); None: 1 on CPU, else the profile's max
    server: "ServerOptions | None" = None  # the `openai` backend: where the model server is
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timings:
    """Wall times of the last batch, for the benchmark and the metrics endpoint."""

    vision_s: float = 0.0
    generate_s: float = 0.0
    new_tokens: int = 0
