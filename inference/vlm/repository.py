"""`dicom-node models`: every model in the repository and whether it is ready here."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .engine import Platform, check_engine, detect_platform, engine_key, weights_fingerprint
from .errors import VLMError
from .spec import ModelSpec, iter_specs


@dataclass(frozen=True)
class ModelStatus:
    name: str
    folder: str
    family: str
    weights_dir: str
    weights_present: bool
    engine_ready: bool  # a TensorRT engine built for this GPU / TensorRT / weights exists
    detail: str  # why not ready (or the engine directory)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _engine_status(spec: ModelSpec, plat: Platform) -> tuple[bool, str]:
    if not plat.has_gpu:
        return False, "no CUDA GPU visible: no TensorRT engine applies"
    if not plat.tensorrt_version:
        return False, "TensorRT not installed"
    from .adapters import adapter_class

    cls = adapter_class(spec.family)
    try:
        adapter = cls(spec)
        shape = adapter.image_shape
    except NotImplementedError:
        return False, f"family {spec.family} has no TensorRT vision engine (dynamic resolution)"
    key = engine_key(spec, cls.version, shape, plat, weights_hash=weights_fingerprint(spec.weights_dir))
    check = check_engine(spec.engines_dir, key)
    return check.ok, str(check.directory) if check.ok else check.message()


def list_models(root: str | os.PathLike | None = None, platform: Platform | None = None) -> list[ModelStatus]:
    plat = platform if platform is not None else detect_platform()
    out = []
    for item in iter_specs(root):
        if isinstance(item, tuple):
            folder, err = item
            out.append(ModelStatus(Path(folder).name, str(folder), "?", "", False, False, str(err)))
            continue
        spec = item
        present = spec.weights_present()
        if not present:
            try:
                spec.require_weights()
            except VLMError as exc:
                detail = str(exc)
            out.append(ModelStatus(spec.name, str(spec.folder), spec.family, str(spec.weights_dir), False, False, detail))
            continue
        try:
            ready, detail = _engine_status(spec, plat)
        except VLMError as exc:
            ready, detail = False, str(exc)
        out.append(ModelStatus(spec.name, str(spec.folder), spec.family, str(spec.weights_dir), True, ready, detail))
    return out
