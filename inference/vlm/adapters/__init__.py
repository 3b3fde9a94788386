"""Model-family adapters behind one interface."""

from __future__ import annotations

from ..errors import ModelConfigError
from ..spec import ModelSpec
from .base import Adapter


def adapter_class(family: str) -> type[Adapter]:
    # Imported lazily: each pulls its transformers model module.
    if family == "gemma3":
        from .gemma3 import Gemma3Adapter

        return Gemma3Adapter
    if family == "qwen2_5_vl":
        from .qwen2_5_vl import Qwen2_5_VLAdapter

        return Qwen2_5_VLAdapter
    if family == "qwen3_vl":
        from .qwen3_vl import Qwen3VLAdapter

        return Qwen3VLAdapter
    raise ModelConfigError(f"no adapter for family {family!r}; expected gemma3, qwen2_5_vl or qwen3_vl")


def make_adapter(spec: ModelSpec) -> Adapter:
    return adapter_class(spec.family)(spec)


__all__ = ["Adapter", "adapter_class", "make_adapter"]
