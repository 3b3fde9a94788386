"""Vision-language comparative reasoning: prior + current + measured regions -> structured findings.

Public API (the node calls only these):
    load_model(model, models_root=None, backend="torch", options=None) -> VLM
    VLM.compare(current, prior, regions, prior_report, indication) -> VLMResult
    VLM.compare_many([CompareRequest, ...]) -> [VLMResult, ...]   (batched; see Batcher)
    list_models(root=None) -> [ModelStatus]                        (`dicom-node models`)
    build_engine(resolve_model(name, root), force=False) -> BuildResult   (`dicom-node build-engine`)
"""

from importlib import import_module

# Loaded on first use: the node imports the result schema (for its reports) in processes that
# never run a model, and those must not pay for torch and transformers.
_EXPORTS = {
    "BACKENDS": ".backends", "BackendOptions": ".backends", "Batcher": ".batcher",
    "BuildResult": ".engine", "build_engine": ".engine", "check_engine": ".engine", "detect_platform": ".engine",
    "BackendUnavailableError": ".errors", "EngineError": ".errors", "ModelConfigError": ".errors",
    "ModelNotFoundError": ".errors", "VLMError": ".errors",
    "ModelServerRejected": ".errors", "ModelServerUnavailable": ".errors", "ServerOptions": ".backends",
    "VLM": ".model", "CompareRequest": ".model", "load_model": ".model",
    "ModelStatus": ".repository", "list_models": ".repository",
    "DeviceFinding": ".schema", "Finding": ".schema", "VLMResult": ".schema",
    "ModelSpec": ".spec", "load_spec": ".spec", "resolve_model": ".spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
