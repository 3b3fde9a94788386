"""Vision-language comparative reasoning: prior + current + measured regions -> structured findings.

Public API (the node calls only these):
    load_model(model, models_root=None, backend="torch", options=None) -> VLM
    VLM.compare(current, prior, regions, prior_report, indication) -> VLMResult
    VLM.compare_many([CompareRequest, ...]) -> [VLMResult, ...]   (batched; see Batcher)
    list_models(root=None) -> [ModelStatus]                        (`dicom-node models`)
    build_engine(resolve_model(name, root), force=False) -> BuildResult   (`dicom-node build-engine`)
"""

from .backends import BACKENDS, BackendOptions
from .batcher import Batcher
from .engine import BuildResult, build_engine, check_engine, detect_platform
from .errors import BackendUnavailableError, EngineError, ModelConfigError, ModelNotFoundError, VLMError
from .model import VLM, CompareRequest, load_model
from .repository import ModelStatus, list_models
from .schema import DeviceFinding, Finding, VLMResult
from .spec import ModelSpec, load_spec, resolve_model

__all__ = [
    "BACKENDS", "BackendOptions", "BackendUnavailableError", "Batcher", "BuildResult", "CompareRequest",
    "DeviceFinding", "EngineError", "Finding", "ModelConfigError", "ModelNotFoundError", "ModelSpec",
    "ModelStatus", "VLM", "VLMError", "VLMResult", "build_engine", "check_engine", "detect_platform",
    "list_models", "load_model", "load_spec", "resolve_model",
]
