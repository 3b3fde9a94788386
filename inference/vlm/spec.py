"""The model repository: one folder per model with a `model.yaml` (data, never weights).

A `ModelSpec` is everything the adapters, backends and engine builder need to know
about one model; paths in model.yaml are resolved relative to the model folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelConfigError, ModelNotFoundError

FAMILIES = ("gemma3", "qwen2_5_vl", "qwen3_vl")
DTYPES = ("float32", "float16", "bfloat16")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
MODELS_ROOT_ENV = "DICOM_NODE_MODELS_ROOT"
# Files a Hugging Face model directory must hold to be loadable offline.
REQUIRED_WEIGHT_FILES = ("config.json", "tokenizer.json")


@dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimisation profile of the vision encoder: batch of images min/opt/max."""

    name: str
    min_batch: int
    opt_batch: int
    max_batch: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    folder: Path
    family: str
    weights_dir: Path
    dtype: str = "bfloat16"
    prompt_set: str = "chest_compare_v1"
    image_size: int = 896  # gemma3: fixed square side; qwen2_5_vl / qwen3_vl: pixel budget side
    crop_size: int = 448  # side of the zoomed region crops before the image processor
    max_regions: int = 4  # crop pairs per comparison (most significant regions first)
    max_new_tokens: int = 512
    precision: str = "fp16"  # engine precision
    engine_profiles: tuple[EngineProfile, ...] = ()
    engines_dir: Path = field(default=Path("engines"))
    description: str = ""

    def require_weights(self) -> Path:
        """The weights directory, or a clear error naming the path and what was expected."""
        d = self.weights_dir
        if not d.is_dir():
            raise ModelNotFoundError(
                f"model {self.name!r}: weights directory {d} does not exist; expected a local Hugging Face "
                f"model directory ({', '.join(REQUIRED_WEIGHT_FILES)}, *.safetensors) for family {self.family!r}"
            )
        missing = [f for f in REQUIRED_WEIGHT_FILES if not (d / f).is_file()]
        if not any(d.glob("*.safetensors")):
            missing.append("*.safetensors")
        if missing:
            raise ModelNotFoundError(
                f"model {self.name!r}: weights directory {d} is incomplete, missing {', '.join(missing)}"
            )
        return d

    def weights_present(self) -> bool:
        try:
            self.require_weights()
        except ModelNotFoundError:
            return False
        return True


def models_root(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root)
    if os.environ.get(MODELS_ROOT_ENV):
        return Path(os.environ[MODELS_ROOT_ENV])
    # The repository's own models/ folder (inference/vlm/spec.py -> repo root).
    return Path(__file__).resolve().parents[2] / "models"


def _req(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ModelConfigError(f"{path}: missing required field {key!r}")
    return data[key]


def _profiles(raw: Any, path: Path) -> tuple[EngineProfile, ...]:
    out = []
    for name, p in (raw or {}).items():
        try:
            mn, opt, mx = (int(p[k]) for k in ("min_batch", "opt_batch", "max_batch"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelConfigError(f"{path}: engine profile {name!r} needs integer min_batch/opt_batch/max_batch") from exc
        if not 1 <= mn <= opt <= mx:
            raise ModelConfigError(f"{path}: engine profile {name!r} needs 1 <= min_batch <= opt_batch <= max_batch")
        out.append(EngineProfile(name, mn, opt, mx))
    return tuple(out)


def load_spec(folder: str | os.PathLike) -> ModelSpec:
    folder = Path(folder)
    path = folder / "model.yaml"
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} does not exist; expected a folder with a model.yaml")
    if not path.is_file():
        raise ModelNotFoundError(f"{path} not found; every model folder needs a model.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a mapping at top level")
    family = _req(data, "family", path)
    if family not in FAMILIES:
        raise ModelConfigError(f"{path}: family {family!r} unknown; expected one of {FAMILIES}")
    dtype = data.get("dtype", "bfloat16")
    if dtype not in DTYPES:
        raise ModelConfigError(f"{path}: dtype {dtype!r} unknown; expected one of {DTYPES}")
    engine = data.get("engine") or {}
    precision = engine.get("precision", "fp16")
    if precision not in PRECISIONS:
        raise ModelConfigError(f"{path}: engine.precision {precision!r} unknown; expected one of {PRECISIONS}")
    weights = Path(os.path.expandvars(str(_req(data, "weights", path))))
    engines = Path(engine.get("dir", "engines"))
    return ModelSpec(
        name=str(data.get("name", folder.name)),
        folder=folder,
        family=family,
        weights_dir=weights if weights.is_absolute() else folder / weights,
        dtype=dtype,
        prompt_set=str(data.get("prompt_set", "chest_compare_v1")),
        image_size=int(data.get("image_size", 896)),
        crop_size=int(data.get("crop_size", 448)),
        max_regions=int(data.get("max_regions", 4)),
        max_new_tokens=int(data.get("max_new_tokens", 512)),
        precision=precision,
        engine_profiles=_profiles(engine.get("profiles"), path),
        engines_dir=engines if engines.is_absolute() else folder / engines,
        description=str(data.get("description", "")),
    )


def resolve_model(model: str | os.PathLike, root: str | os.PathLike | None = None) -> ModelSpec:
    """A model by folder path, or by name under the models root."""
    p = Path(model)
    if p.is_dir() or p.is_absolute() or os.sep in str(model):
        return load_spec(p)
    base = models_root(root)
    if not (base / str(model)).is_dir():
        known = sorted(y.parent.name for y in base.glob("*/model.yaml"))
        raise ModelNotFoundError(
            f"model {str(model)!r} not found under {base}; expected {base / str(model) / 'model.yaml'}"
            + (f" (known: {', '.join(known)})" if known else "")
        )
    return load_spec(base / str(model))


def iter_specs(root: str | os.PathLike | None = None) -> list[ModelSpec | tuple[Path, Exception]]:
    """Every model folder under the root; a broken one comes back as (folder, error), not raised."""
    base = models_root(root)
    out: list[ModelSpec | tuple[Path, Exception]] = []
    for yml in sorted(base.glob("*/model.yaml")):
        try:
            out.append(load_spec(yml.parent))
        except (ModelConfigError, ModelNotFoundError) as exc:
            out.append((yml.parent, exc))
    return out
