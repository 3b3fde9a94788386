"""`tensorrt`: vision encoder as a TensorRT engine built from the ONNX export; the language model
decodes with a static KV cache compiled by Torch-TensorRT (`torch.compile(backend="torch_tensorrt")`)
where the torch_tensorrt package is installed, else by the configured torch.compile backend
(inductor, CUDA graphs), with a warning saying so.

Import-guarded: without TensorRT (or without a GPU) loading raises BackendUnavailableError with
a clear message; `load_backend` then uses the configured fallback backend, if any. An engine
missing or built for another GPU / TensorRT / weights is detected from its manifest and rebuilt
or refused (BackendOptions.on_engine_mismatch), never loaded blindly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import CompileConfig

from ..engine import VISION_ENGINE, TensorRTBuilder, build_engine, check_engine, detect_platform, engine_key, import_tensorrt
from ..errors import BackendUnavailableError, EngineError
from ..onnx_export import INPUT_NAME, OUTPUT_NAME
from .torch_backend import TorchCompileBackend

log = logging.getLogger(__name__)


class TensorRTVisionRunner:
    """Runs a serialized engine on torch CUDA tensors (TensorRT 10 tensor-address API)."""

    def __init__(self, trt: Any, engine_path: Path, max_batch: int):
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {engine_path} (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.max_batch = max_batch
        self.in_dtype = self._torch_dtype(self.engine.get_tensor_dtype(INPUT_NAME))
        self.out_dtype = self._torch_dtype(self.engine.get_tensor_dtype(OUTPUT_NAME))

    def _torch_dtype(self, dt: Any) -> torch.dtype:
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[dt]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to("cuda", self.in_dtype).contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=self.out_dtype, device="cuda")
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EngineError("TensorRT execution failed")
        return out

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # More images than the profile's max batch: run in chunks.
        return torch.cat([self._run(c) for c in pixel_values.split(self.max_batch)])


TORCH_TENSORRT = "torch_tensorrt"  # the torch.compile backend name Torch-TensorRT registers


def torch_tensorrt_installed() -> bool:
    try:
        import torch_tensorrt  # noqa: F401, PLC0415  (importing it registers the compile backend)
    except Exception:  # ImportError, or a wheel built for another torch / CUDA
        return False
    return True


def torch_tensorrt_config(dtype: torch.dtype, fallback: CompileConfig) -> CompileConfig:
    """The decode step compiled by Torch-TensorRT, in the dtype the model runs in."""
    # torch.compile takes either a mode or options, not both: Torch-TensorRT is configured by options.
    config = CompileConfig(
        backend=TORCH_TENSORRT,
        mode=None,  # type: ignore[arg-type]
        fullgraph=False,
        dynamic=False,  # static cache: one engine per prompt bucket, like the CUDA graphs path
        options={"enabled_precisions": {dtype}, "min_block_size": 1},
    )
    config._compile_all_devices = fallback._compile_all_devices  # same device rule as the fallback
    return config


class TensorRTBackend(TorchCompileBackend):
    name = "tensorrt"
    use_torch_tensorrt = False  # decided at load (choose_lm_compiler)

    def load(self) -> "TensorRTBackend":
        self.trt = import_tensorrt()  # clear BackendUnavailableError before any weights are read
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the tensorrt backend needs an NVIDIA GPU; torch sees no CUDA device")
        self.choose_lm_compiler()
        return super().load()  # type: ignore[return-value]

    def language_model_compiler(self) -> str:
        return TORCH_TENSORRT if self.use_torch_tensorrt else super().language_model_compiler()

    def choose_lm_compiler(self) -> str:
        self.use_torch_tensorrt = torch_tensorrt_installed()
        if not self.use_torch_tensorrt:
            self._without_torch_tensorrt("torch_tensorrt is not installed")
        return self.language_model_compiler()

    def _without_torch_tensorrt(self, why: str) -> None:
        self.use_torch_tensorrt = False
        log.warning(
            "%s: the language model of %s decodes with %s instead of Torch-TensorRT "
            "(the vision encoder still runs as a TensorRT engine)",
            why,
            self.spec.name,
            self.language_model_compiler(),
        )

    def warm_up(self, prompt) -> None:
        """Compiles the decode step; if Torch-TensorRT cannot compile it, decode with torch.compile."""
        try:
            super().warm_up(prompt)
        except Exception as exc:
            if not self.use_torch_tensorrt:
                raise
            self._without_torch_tensorrt(f"Torch-TensorRT could not compile it ({type(exc).__name__}: {exc})")
            torch._dynamo.reset()  # drop the failed compilation before compiling again
            super().warm_up(prompt)

    def _generate_kwargs(self, batch_size: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
        kw = super()._generate_kwargs(batch_size, prompt_len, new_tokens)
        if self.use_torch_tensorrt:
            assert self.model is not None
            kw["compile_config"] = torch_tensorrt_config(self.model.dtype, kw["compile_config"])
        return kw

    def _load_vision(self) -> None:
        assert self.adapter is not None
        plat = detect_platform()
        key = engine_key(self.spec, self.adapter.version, self.adapter.image_shape, plat, kind="tensorrt")
        check = check_engine(self.spec.engines_dir, key)
        if not check.ok:
            if self.options.on_engine_mismatch != "rebuild":
                raise EngineError(f"model {self.spec.name!r}: {check.message()}; run `dicom-node build-engine {self.spec.name}`")
            log.warning("building TensorRT engine for %s: %s", self.spec.name, check.message())
            check = check_engine(self.spec.engines_dir, build_engine(self.spec, TensorRTBuilder(), plat).key)
            if not check.ok:
                raise EngineError(check.message())
        max_batch = min(p[3] for p in key.profile)
        self.vision = TensorRTVisionRunner(self.trt, check.directory / VISION_ENGINE, max_batch)

    def encode_images(self, pixel_values: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        assert self.model is not None
        return self.vision(pixel_values).to(self.model.dtype)
