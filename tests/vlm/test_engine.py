"""Engine cache keys, manifests and the build driver, with a fake builder where TensorRT is absent."""

import dataclasses
import json
import shutil

import pytest

from inference.vlm import EngineError, build_engine, list_models
from inference.vlm.engine import (
    MANIFEST, VISION_ENGINE, VISION_ONNX, EngineKey, Platform, check_engine, engine_key, weights_fingerprint,
)
from inference.vlm.spec import resolve_model

H100 = Platform("NVIDIA H100 80GB HBM3", "9.0", "12.8", "10.9.0")
A100 = Platform("NVIDIA A100-SXM4-80GB", "8.0", "12.8", "10.9.0")


class FakeBuilder:
    """Records the build request and writes a placeholder engine (stands in for TensorRT)."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def build(self, onnx_path, engine_path, precision, profiles, input_name, input_shape):
        assert onnx_path.is_file() and onnx_path.stat().st_size > 0
        self.calls.append((precision, tuple(profiles), input_name, tuple(input_shape)))
        engine_path.write_bytes(b"fake-engine")


@pytest.fixture
def spec(models_root, tmp_path):
    # A private copy: builds must not leak into other tests' engine dirs.
    shutil.copytree(models_root / "tiny-gemma3", tmp_path / "tiny-gemma3", symlinks=True)
    return resolve_model("tiny-gemma3", tmp_path)


def _key(spec, plat=H100):
    return engine_key(spec, "gemma3-1", (3, 32, 32), plat)


def test_cache_key_covers_every_input(spec):
    base = _key(spec)
    variants = [
        _key(spec, A100),
        _key(spec, dataclasses.replace(H100, tensorrt_version="10.10.0")),
        _key(spec, dataclasses.replace(H100, cuda_version="13.0")),
        _key(dataclasses.replace(spec, precision="bf16")),
        engine_key(spec, "gemma3-2", (3, 32, 32), H100),
        engine_key(spec, "gemma3-1", (3, 64, 64), H100),
        engine_key(spec, "gemma3-1", (3, 32, 32), H100, weights_hash="0" * 64),
        _key(dataclasses.replace(spec, engine_profiles=())),
    ]
    digests = {base.digest()} | {v.digest() for v in variants}
    assert len(digests) == len(variants) + 1
    assert base.dirname().startswith("tensorrt-nvidia-h100-80gb-hbm3-sm90-trt10.9.0-fp16-")
    assert EngineKey.from_json(json.loads(json.dumps(base.to_json()))) == base


def test_weights_fingerprint_tracks_weight_changes(spec, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(spec.weights_dir, w)
    before = weights_fingerprint(w)
    assert weights_fingerprint(w) == before
    st = next(w.glob("*.safetensors"))
    data = bytearray(st.read_bytes())
    data[-1] ^= 0xFF
    st.write_bytes(bytes(data))
    assert weights_fingerprint(w) != before


def test_build_writes_manifest_and_is_cached(spec):
    fb = FakeBuilder()
    res = build_engine(spec, builder=fb, platform=H100)
    assert res.built and fb.calls == [("fp16", (("vision", 1, 6, 12),), "pixel_values", (3, 32, 32))]
    doc = json.loads((res.directory / MANIFEST).read_text())
    assert doc["key"]["gpu_name"] == H100.gpu_name and doc["key"]["compute_capability"] == "9.0"
    assert doc["key"]["weights_hash"] == weights_fingerprint(spec.weights_dir) and doc["builder"] == "fake"
    assert (res.directory / VISION_ENGINE).is_file() and (res.directory / VISION_ONNX).is_file()
    assert check_engine(spec.engines_dir, res.key).ok
    again = build_engine(spec, builder=fb, platform=H100)
    assert not again.built and len(fb.calls) == 1
    build_engine(spec, builder=fb, platform=H100, force=True)
    assert len(fb.calls) == 2


def test_engine_for_other_gpu_is_detected_with_reason(spec):
    build_engine(spec, builder=FakeBuilder(), platform=A100)
    check = check_engine(spec.engines_dir, engine_key(spec, "gemma3-1", (3, 32, 32), H100))
    assert check.status == "incompatible"
    assert any("gpu_name" in r and "A100" in r for r in check.reasons)
    assert any("compute_capability" in r for r in check.reasons)


def test_missing_corrupt_and_tampered_manifests(spec):
    key = engine_key(spec, "gemma3-1", (3, 32, 32), H100)
    assert check_engine(spec.engines_dir, key).status == "missing"
    res = build_engine(spec, builder=FakeBuilder(), platform=H100)
    (res.directory / VISION_ENGINE).unlink()
    assert check_engine(spec.engines_dir, res.key).status == "corrupt"
    (res.directory / MANIFEST).write_text("{not json")
    assert check_engine(spec.engines_dir, res.key).status == "corrupt"
    doc = {"format": 1, "key": {**res.key.to_json(), "tensorrt_version": "8.6.1"}, "files": {}}
    (res.directory / MANIFEST).write_text(json.dumps(doc))
    check = check_engine(spec.engines_dir, res.key)
    assert check.status == "incompatible" and any("8.6.1" in r for r in check.reasons)


def test_failed_build_leaves_no_manifest(spec):
    class Broken(FakeBuilder):
        def build(self, *a, **k):
            raise EngineError("builder exploded")

    with pytest.raises(EngineError):
        build_engine(spec, builder=Broken(), platform=H100)
    assert check_engine(spec.engines_dir, _key(spec)).status in ("missing", "incompatible")
    assert not any(spec.engines_dir.glob(f"tensorrt-*/{MANIFEST}"))


def test_real_builder_absent_is_clear(spec):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except Exception:
        pass
    from inference.vlm import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="TensorRT Python library"):
        build_engine(spec, platform=H100)


def test_qwen_has_no_engine(models_root):
    from inference.vlm import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="dynamic resolution"):
        build_engine(resolve_model("tiny-qwen2_5_vl", models_root), builder=FakeBuilder(), platform=H100)


def test_models_listing_reports_engine_ready(spec):
    root = spec.folder.parent
    before = {s.name: s for s in list_models(root, platform=H100)}["tiny-gemma3"]
    assert before.weights_present and not before.engine_ready and "missing" in before.detail
    build_engine(spec, builder=FakeBuilder(), platform=H100)
    after = {s.name: s for s in list_models(root, platform=H100)}["tiny-gemma3"]
    assert after.engine_ready
    other = {s.name: s for s in list_models(root, platform=A100)}["tiny-gemma3"]
    assert not other.engine_ready and "A100" in other.detail
