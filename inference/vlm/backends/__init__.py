"""Backend registry; `load_backend` applies the configured fallback when one is unavailable.

Importing this package does not import torch: the `openai` backend (a client of a model server)
runs in processes that have no torch at all."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailableError
from ..spec import ModelSpec
from .options import BackendOptions, ServerOptions, Timings

if TYPE_CHECKING:  # pragma: no cover
    from .base import VLMBackend

log = logging.getLogger(__name__)
BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt", "openai")
IN_PROCESS = ("torch", "torch-compile", "onnxruntime", "tensorrt")


def backend_class(name: str) -> type[Any]:
    if name == "torch":
        from .torch_backend import TorchBackend as cls
    elif name == "torch-compile":
        from .torch_backend import TorchCompileBackend as cls
    elif name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend as cls
    elif name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend as cls
    elif name == "openai":
        from .openai_backend import OpenAIBackend as cls
    else:
        raise BackendUnavailableError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return cls


def load_backend(spec: ModelSpec, name: str = "torch", options: BackendOptions | None = None) -> "VLMBackend":
    """A loaded backend; on BackendUnavailableError use options.fallback (once) if configured."""
    options = options or BackendOptions()
    try:
        return backend_class(name)(spec, options).load()
    except BackendUnavailableError as exc:
        if not options.fallback or options.fallback == name:
            raise
        log.warning("backend %s unavailable (%s); falling back to %s", name, exc, options.fallback)
        fb = BackendOptions(**{**options.__dict__, "fallback": None})
        return backend_class(options.fallback)(spec, fb).load()


def __getattr__(name: str) -> Any:
    if name == "VLMBackend":  # torch: only for the in-process backends
        from .base import VLMBackend

        return VLMBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "IN_PROCESS", "BackendOptions", "ServerOptions", "Timings", "VLMBackend", "backend_class", "load_backend"]
