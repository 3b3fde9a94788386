"""Backends agree with the torch reference; unavailable ones fail clearly (or fall back)."""

import numpy as np
import pytest
import torch

from inference.vlm import BackendOptions, BackendUnavailableError, CompareRequest, load_model
from inference.vlm.adapters import make_adapter
from inference.vlm.onnx_export import export_vision_encoder
from inference.vlm.spec import resolve_model


def test_onnx_vision_encoder_matches_torch(models_root, tmp_path):
    import onnxruntime as ort
    spec = resolve_model("tiny-gemma3", models_root)
    ad = make_adapter(spec)
    model = ad.load_model("cpu", "float32")
    path = export_vision_encoder(ad, model, tmp_path / "vision.onnx", example_batch=2)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *ad.image_shape, generator=torch.Generator().manual_seed(0))  # batch != export example
    ref = ad.vision_features(model, x, None).detach().numpy()
    got = sess.run(None, {"pixel_values": x.numpy()})[0]
    assert got.shape == ref.shape == (5, 16, 64)
    assert np.abs(ref).max() > 0.1  # a non-trivial encoder, so agreement means something
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert next(model.parameters()).dtype == torch.float32  # export did not touch the serving model


def _greedy(vlm, req, n=8):
    return vlm.backend.run_batch([vlm.prompt(req)], max_new_tokens=n, ignore_eos=True)[0]


def test_onnxruntime_backend_generates_like_torch(models_root, torch_vlms, pair, regions):
    prior, current = pair
    req = CompareRequest(current, prior, tuple(regions))
    vlm = load_model("tiny-gemma3", models_root, backend="onnxruntime")
    assert vlm.backend.providers[-1] == "CPUExecutionProvider"
    assert vlm.backend.images_per_run == 1  # one image per run on a CPU: scratch memory stays small
    assert _greedy(vlm, req) == _greedy(torch_vlms["gemma3"], req)
    # The export is cached under a manifest: a second load reuses it.
    onnx_dirs = list((models_root / "tiny-gemma3" / "engines").glob("onnx-*"))
    assert len(onnx_dirs) == 1 and (onnx_dirs[0] / "manifest.json").is_file()
    mtime = (onnx_dirs[0] / "vision.onnx").stat().st_mtime_ns
    load_model("tiny-gemma3", models_root, backend="onnxruntime")
    assert (onnx_dirs[0] / "vision.onnx").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_onnxruntime_refuses_dynamic_resolution_family_clearly(models_root, family):
    with pytest.raises(BackendUnavailableError, match="dynamic resolution.*torch"):
        load_model(f"tiny-{family}", models_root, backend="onnxruntime")


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl", "qwen3_vl"])
def test_torch_compile_static_cache_matches_eager(models_root, torch_vlms, family, pair, regions):
    prior, current = pair
    req = CompareRequest(current, prior, tuple(regions))
    # The "eager" torch.compile backend keeps the test fast on 2 CPU cores; the static cache,
    # the compiled decode step and prompt bucketing are the same code as with inductor.
    opts = BackendOptions(compile_backend="eager", pad_to_multiple=64)
    vlm = load_model(f"tiny-{family}", models_root, backend="torch-compile", options=opts)
    assert _greedy(vlm, req) == _greedy(torch_vlms[family], req)


def test_tensorrt_absent_is_a_clear_error_not_importerror(models_root):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except Exception:
        pass
    with pytest.raises(BackendUnavailableError) as e:
        load_model("tiny-gemma3", models_root, backend="tensorrt")
    assert "TensorRT" in str(e.value) and "onnxruntime" in str(e.value)
    assert not isinstance(e.value, ImportError)


def test_tensorrt_falls_back_by_configuration(models_root):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except Exception:
        pass
    vlm = load_model("tiny-gemma3", models_root, backend="tensorrt", options=BackendOptions(fallback="torch"))
    assert vlm.backend.name == "torch"


def test_unknown_backend(models_root):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tvm'"):
        load_model("tiny-gemma3", models_root, backend="tvm")


@pytest.fixture
def fresh_compilation(torch_vlms):
    """The shared tiny model keeps its compiled decode step (transformers caches it on the model,
    bound to the compile backend of the time): drop it around tests that swap compile backends."""

    def drop() -> None:
        model = torch_vlms["gemma3"].backend.model
        for attr in ("_compiled_call", "_last_compile_config"):
            if hasattr(model, attr):
                delattr(model, attr)
        torch._dynamo.reset()

    drop()
    yield
    drop()


class _TensorRTLanguageModelOnly:
    """The tensorrt backend's decode path without its vision engine (no TensorRT or GPU here):
    the vision encoder runs in torch, the language model goes through `torch_tensorrt_config`."""

    @staticmethod
    def make(spec):
        from inference.vlm.backends.tensorrt_backend import TensorRTBackend

        class Backend(TensorRTBackend):
            def load(self):
                return self  # the model is adopted; TensorRT itself is never imported

            def _load_vision(self) -> None:
                pass

            def encode_images(self, pixel_values, grid):
                return super(TensorRTBackend, self).encode_images(pixel_values, grid)

        return Backend(spec, BackendOptions(compile_backend="eager", pad_to_multiple=64))


def test_tensorrt_language_model_compiles_through_torch_tensorrt(models_root, torch_vlms, pair, regions, monkeypatch,
                                                                 fresh_compilation):
    import sys
    import types

    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS

    # Torch-TensorRT registers the torch.compile backend "torch_tensorrt" when imported; a
    # recording stand-in takes its place (TensorRT cannot run here) and runs the graph as is.
    calls = []

    def recording_backend(graph_module, example_inputs, **kwargs):
        calls.append(kwargs)
        return graph_module.forward

    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    monkeypatch.setitem(_BACKENDS, "torch_tensorrt", None)
    monkeypatch.setitem(_COMPILER_FNS, "torch_tensorrt", recording_backend)

    spec = resolve_model("tiny-gemma3", models_root)
    backend = _TensorRTLanguageModelOnly.make(spec)
    assert backend.choose_lm_compiler() == "torch_tensorrt"
    reference = torch_vlms["gemma3"]
    backend.adopt(make_adapter(spec), reference.backend.model)
    prior, current = pair
    req = CompareRequest(current, prior, tuple(regions))
    got = backend.run_batch([reference.prompt(req)], max_new_tokens=8, ignore_eos=True)[0]
    assert got == _greedy(reference, req)  # the compiled decode step gives the eager tokens
    assert calls, "the decode step was never compiled by the torch_tensorrt backend"
    assert calls[0]["options"]["enabled_precisions"] == {reference.backend.model.dtype}  # the dtype the model runs in
    assert "mode" not in calls[0]  # torch.compile refuses a mode together with options


def test_tensorrt_language_model_without_torch_tensorrt_says_so(models_root, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails, as where it is absent
    backend = _TensorRTLanguageModelOnly.make(resolve_model("tiny-gemma3", models_root))
    with caplog.at_level("WARNING"):
        assert backend.choose_lm_compiler() == "torch.compile(eager)"
    assert "torch_tensorrt is not installed" in caplog.text and "tiny-gemma3" in caplog.text


def test_tensorrt_language_model_falls_back_when_torch_tensorrt_cannot_compile(models_root, torch_vlms, pair, regions,
                                                                                monkeypatch, caplog, fresh_compilation):
    import sys
    import types

    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS

    def failing_backend(graph_module, example_inputs, **kwargs):
        raise RuntimeError("unsupported op in the decode graph")

    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    monkeypatch.setitem(_BACKENDS, "torch_tensorrt", None)
    monkeypatch.setitem(_COMPILER_FNS, "torch_tensorrt", failing_backend)

    spec = resolve_model("tiny-gemma3", models_root)
    backend = _TensorRTLanguageModelOnly.make(spec)
    backend.choose_lm_compiler()
    reference = torch_vlms["gemma3"]
    backend.adopt(make_adapter(spec), reference.backend.model)
    prior, current = pair
    prompt = reference.prompt(CompareRequest(current, prior, tuple(regions)))
    with caplog.at_level("WARNING"):
        backend.warm_up(prompt)
    assert backend.language_model_compiler() == "torch.compile(eager)"
    assert "Torch-TensorRT could not compile it" in caplog.text and "unsupported op" in caplog.text
    got = backend.run_batch([prompt], max_new_tokens=8, ignore_eos=True)[0]
    assert got == reference.backend.run_batch([prompt], max_new_tokens=8, ignore_eos=True)[0]
