"""`torch` (eager reference, SDPA attention) and `torch-compile` (static KV cache + torch.compile;
CUDA graphs through mode reduce-overhead on GPU)."""

from __future__ import annotations

from typing import Any

from transformers import CompileConfig, StaticCache

from .base import VLMBackend


class TorchBackend(VLMBackend):
    name = "torch"

    def _generate_kwargs(self, batch_size: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
        return {"disable_compile": True}


class TorchCompileBackend(VLMBackend):
    name = "torch-compile"

    def language_model_compiler(self) -> str:
        return f"torch.compile({self.options.compile_backend})"

    def _pad_multiple(self) -> int:
        # Bucketed prompt lengths give repeating static-cache sizes, hence no recompiles.
        return max(1, self.options.pad_to_multiple)

    def _generate_kwargs(self, batch_size: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
        gpu = self.device.type == "cuda"
        mode = self.options.compile_mode or ("reduce-overhead" if gpu else "default")
        cc = CompileConfig(backend=self.options.compile_backend, mode=mode, fullgraph=False, dynamic=None)
        cc._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
        # One cache length per prompt bucket whatever max_new_tokens is asked: a new length would
        # be a new static shape, i.e. a recompile (and new CUDA graphs).
        m = self._pad_multiple()
        length = -(-(prompt_len + max(new_tokens, self.spec.max_new_tokens)) // m) * m
        assert self.model is not None
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        return {"past_key_values": cache, "compile_config": cc}
