"""`torch` (eager reference, SDPA attention) and `torch-compile` (static KV cache + torch.compile;
CUDA graphs through mode reduce-overhead on GPU)."""

from __future__ import annotations

from typing import Any

from transformers import CompileConfig

from .base import VLMBackend


class TorchBackend(VLMBackend):
    name = "torch"

    def _generate_kwargs(self) -> dict[str, Any]:
        return {"disable_compile": True}


class TorchCompileBackend(VLMBackend):
    name = "torch-compile"

    def _pad_multiple(self) -> int:
        # Bucketed prompt lengths give repeating static-cache sizes, hence no recompiles.
        return max(1, self.options.pad_to_multiple)

    def _generate_kwargs(self) -> dict[str, Any]:
        gpu = self.device.type == "cuda"
        mode = self.options.compile_mode or ("reduce-overhead" if gpu else "default")
        cc = CompileConfig(backend=self.options.compile_backend, mode=mode, fullgraph=False, dynamic=False)
        cc._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
        return {"cache_implementation": "static", "compile_config": cc}
