"""Compiled-engine cache: keys, manifests, compatibility checks and the build driver.

An engine is only valid for the exact weights, adapter version, GPU (name + compute capability),
TensorRT / CUDA versions, precision and input profile it was built with. All of that is the
cache key; the manifest written beside the files repeats it so that a load can tell *why* an
engine does not fit (and rebuild or refuse) instead of crashing inside TensorRT."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from .errors import BackendUnavailableError, EngineError
from .spec import EngineProfile, ModelSpec

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
VISION_ONNX = "vision.onnx"
VISION_ENGINE = "vision.plan"
_FP_CHUNK = 1 << 20


# --- weights fingerprint ---------------------------------------------------------------------
def weights_fingerprint(weights_dir: Path) -> str:
    """sha256 over config + each weight file's name, size, first and last MiB.

    Reading multi-GB weights at every load would cost seconds; the safetensors header (tensor
    names, dtypes, shapes, offsets) sits in the first MiB and any re-save changes sizes or
    tails, so this catches the changes that matter for an engine."""
    h = hashlib.sha256()
    for name in ("config.json",):
        p = weights_dir / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    for p in sorted(weights_dir.glob("*.safetensors")):
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as f:
            h.update(f.read(_FP_CHUNK))
            if size > 2 * _FP_CHUNK:
                f.seek(size - _FP_CHUNK)
                h.update(f.read(_FP_CHUNK))
    return h.hexdigest()


# --- platform --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Platform:
    gpu_name: str = ""
    compute_capability: str = ""
    cuda_version: str = ""
    tensorrt_version: str = ""

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu_name)


def import_tensorrt() -> Any:
    """The tensorrt module, or a clear BackendUnavailableError (never a bare ImportError)."""
    try:
        import tensorrt  # noqa: PLC0415

        tensorrt.Builder  # PyPI stub packages import but carry no library
    except Exception as exc:  # ImportError, or the stub's RuntimeError / AttributeError
        raise BackendUnavailableError(
            "the tensorrt backend needs the TensorRT Python library, which is not installed here "
            f"({type(exc).__name__}: {exc}). Use NVIDIA's TensorRT container image (deploy/), or choose "
            "backend 'onnxruntime' / 'torch-compile', or set a fallback backend in the configuration."
        ) from None
    return tensorrt


def detect_platform() -> Platform:
    import torch

    if not torch.cuda.is_available():
        return Platform()
    major, minor = torch.cuda.get_device_capability(0)
    try:
        trt_version = import_tensorrt().__version__
    except BackendUnavailableError:
        trt_version = ""
    return Platform(torch.cuda.get_device_name(0), f"{major}.{minor}", torch.version.cuda or "", trt_version)


# --- keys and manifests ------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineKey:
    kind: str  # "tensorrt" | "onnx"
    model: str
    weights_hash: str
    adapter_version: str
    precision: str
    profile: tuple[tuple[str, int, int, int], ...]  # (name, min, opt, max) image-batch profiles
    input_shape: tuple[int, ...]  # per-image (C, H, W)
    gpu_name: str = ""
    compute_capability: str = ""
    tensorrt_version: str = ""
    cuda_version: str = ""

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def dirname(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-") or "any"
        cc = f"-sm{self.compute_capability.replace('.', '')}" if self.compute_capability else ""
        trt = f"-trt{self.tensorrt_version}" if self.tensorrt_version else ""
        return f"{self.kind}-{gpu}{cc}{trt}-{self.precision}-{self.digest()}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile"] = [list(p) for p in self.profile]
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EngineKey":
        d = dict(d)
        d["profile"] = tuple(tuple(p) for p in d.get("profile", ()))
        d["input_shape"] = tuple(d.get("input_shape", ()))
        return cls(**d)


def engine_key(spec: ModelSpec, adapter_version: str, input_shape: Sequence[int], platform: Platform | None,
               kind: str = "tensorrt", weights_hash: str | None = None) -> EngineKey:
    plat = platform or Platform()
    trt = kind == "tensorrt"
    profiles = spec.engine_profiles or (EngineProfile("vision", 1, 2, 8),)
    return EngineKey(
        kind=kind,
        model=spec.name,
        weights_hash=weights_hash or weights_fingerprint(spec.require_weights()),
        adapter_version=adapter_version,
        precision=spec.precision if trt else "fp32",
        profile=tuple((p.name, p.min_batch, p.opt_batch, p.max_batch) for p in profiles) if trt else (),
        input_shape=tuple(int(x) for x in input_shape),
        gpu_name=plat.gpu_name if trt else "",
        compute_capability=plat.compute_capability if trt else "",
        tensorrt_version=plat.tensorrt_version if trt else "",
        cuda_version=plat.cuda_version if trt else "",
    )


@dataclass
class EngineCheck:
    status: str  # "ok" | "missing" | "incompatible" | "corrupt"
    directory: Path
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def message(self) -> str:
        return f"engine {self.status} at {self.directory}" + (": " + "; ".join(self.reasons) if self.reasons else "")


def write_manifest(directory: Path, key: EngineKey, files: dict[str, str], builder: str, io: dict[str, Any]) -> Path:
    doc = {"format": MANIFEST_FORMAT, "digest": key.digest(), "key": key.to_json(), "files": files,
           "builder": builder, "io": io, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, directory / MANIFEST)  # the manifest appears last and atomically: it marks a complete build
    return directory / MANIFEST


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())


def _diff(want: EngineKey, have: dict[str, Any]) -> list[str]:
    w = want.to_json()
    return [f"{k}: engine built for {have.get(k)!r}, need {v!r}" for k, v in w.items() if have.get(k) != v]


def check_engine(engines_dir: Path, key: EngineKey) -> EngineCheck:
    """Is there a complete engine for exactly this key? If not, say why (closest other build)."""
    d = engines_dir / key.dirname()
    if (d / MANIFEST).is_file():
        try:
            doc = read_manifest(d)
        except (OSError, ValueError) as exc:
            return EngineCheck("corrupt", d, [f"unreadable {MANIFEST}: {exc}"])
        if doc.get("format") != MANIFEST_FORMAT:
            return EngineCheck("incompatible", d, [f"manifest format {doc.get('format')!r}, need {MANIFEST_FORMAT}"])
        reasons = _diff(key, doc.get("key", {}))
        if reasons:
            return EngineCheck("incompatible", d, reasons)
        missing = [f for f in doc.get("files", {}).values() if not (d / f).is_file()]
        if missing:
            return EngineCheck("corrupt", d, [f"missing file {m}" for m in missing])
        return EngineCheck("ok", d)
    # No exact build: report how the nearest build of the same kind differs (what to rebuild for).
    others = []
    for m in sorted(engines_dir.glob(f"{key.kind}-*/{MANIFEST}")) if engines_dir.is_dir() else []:
        try:
            others.append(_diff(key, read_manifest(m.parent).get("key", {})))
        except (OSError, ValueError):
            continue
    if others:
        return EngineCheck("incompatible", d, min(others, key=len))
    return EngineCheck("missing", d, [f"no {key.kind} build under {engines_dir}"])


# --- builders ---------------------------------------------------------------------------------
class EngineBuilder(Protocol):
    name: str

    def build(self, onnx_path: Path, engine_path: Path, precision: str, profiles: Sequence[tuple[str, int, int, int]],
              input_name: str, input_shape: tuple[int, ...]) -> None: ...


class TensorRTBuilder:
    """ONNX -> serialized TensorRT engine with the `tensorrt` builder API (TensorRT 10)."""

    name = "tensorrt"

    def __init__(self, workspace_gib: int = 8):
        self.trt = import_tensorrt()
        self.workspace = workspace_gib << 30

    def build(self, onnx_path, engine_path, precision, profiles, input_name, input_shape) -> None:
        trt = self.trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {onnx_path}: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        elif precision == "int8":
            raise EngineError("int8 engines need a calibration set, which this build does not have; use fp16 or bf16")
        for _, mn, opt, mx in profiles:
            prof = builder.create_optimization_profile()
            prof.set_shape(input_name, (mn, *input_shape), (opt, *input_shape), (mx, *input_shape))
            config.add_optimization_profile(prof)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
        engine_path.write_bytes(bytes(blob))


@dataclass
class BuildResult:
    directory: Path
    key: EngineKey
    built: bool  # False: an up-to-date engine was already there


def _export(spec: ModelSpec, adapter: Any, model: Any, directory: Path) -> Path:
    from .onnx_export import export_vision_encoder

    try:
        return export_vision_encoder(adapter, model, directory / VISION_ONNX)
    except NotImplementedError as exc:
        raise BackendUnavailableError(
            f"model {spec.name!r}: {exc}; use backend 'torch' or 'torch-compile' for this family"
        ) from None


def _image_shape(spec: ModelSpec, adapter: Any) -> tuple[int, ...]:
    try:
        return tuple(adapter.image_shape)
    except NotImplementedError as exc:
        raise BackendUnavailableError(
            f"model {spec.name!r}: {exc}, so no ONNX / TensorRT vision encoder; use backend 'torch' or 'torch-compile'"
        ) from None


def ensure_onnx(spec: ModelSpec, adapter: Any, model: Any, force: bool = False) -> Path:
    """The exported vision encoder for these weights, exporting it if missing or stale."""
    key = engine_key(spec, adapter.version, _image_shape(spec, adapter), None, kind="onnx")
    check = check_engine(spec.engines_dir, key)
    if check.ok and not force:
        return check.directory / VISION_ONNX
    if check.status != "missing":
        log.info("re-exporting vision encoder: %s", check.message())
    check.directory.mkdir(parents=True, exist_ok=True)
    _export(spec, adapter, model, check.directory)
    write_manifest(check.directory, key, {"vision_onnx": VISION_ONNX}, "torch.onnx",
                   {"input": "pixel_values", "output": "image_features"})
    return check.directory / VISION_ONNX


def build_engine(spec: ModelSpec, builder: EngineBuilder | None = None, platform: Platform | None = None,
                 force: bool = False) -> BuildResult:
    """`dicom-node build-engine MODEL`: export ONNX, build the TensorRT engine, write the manifest."""
    from .adapters import make_adapter

    plat = platform or detect_platform()
    if builder is None:
        builder = TensorRTBuilder()  # raises a clear error where TensorRT is absent
        if not plat.has_gpu:
            raise EngineError("building a TensorRT engine needs an NVIDIA GPU; none is visible here")
    adapter = make_adapter(spec)
    shape = _image_shape(spec, adapter)
    key = engine_key(spec, adapter.version, shape, plat, kind="tensorrt")
    check = check_engine(spec.engines_dir, key)
    if check.ok and not force:
        return BuildResult(check.directory, key, built=False)
    d = check.directory
    d.mkdir(parents=True, exist_ok=True)
    (d / MANIFEST).unlink(missing_ok=True)  # a half-rebuilt directory must not look complete
    model = adapter.load_model("cpu", "float32")
    onnx_path = _export(spec, adapter, model, d)
    del model
    builder.build(onnx_path, d / VISION_ENGINE, key.precision, key.profile, "pixel_values", tuple(shape))
    write_manifest(d, key, {"vision_onnx": VISION_ONNX, "vision_engine": VISION_ENGINE}, builder.name,
                   {"input": "pixel_values", "output": "image_features"})
    return BuildResult(d, key, built=True)

