"""The VLM step of a comparison, when a model is configured.

The model is loaded once per worker process.
- In-process backends (torch, torch-compile, onnxruntime, tensorrt): requests go through a
  micro-batcher; with a threaded gpu worker (`dicom-node worker -Q gpu --pool threads -c 4`)
  concurrent comparisons run as one batch of up to `vlm_max_batch_size`; with prefork, batches of one.
- `openai` (a model server): each comparison is its own request from the worker thread that runs
  it, at most `vlm_max_concurrency` in flight per process; the gpu worker then defaults to a
  thread pool of that size (cli.py), so the server sees that many requests at once and batches
  them. That worker needs no GPU, torch or transformers.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import Settings

SERVED = "openai"


def vlm_enabled(settings: Settings) -> bool:
    """A model reads the comparisons: a model folder, or a model server to send them to."""
    return bool(settings.vlm_model) or (settings.vlm_backend == SERVED and bool(settings.vlm_base_url))


def vlm_model_name(settings: Settings) -> str:
    """The model as the job key, the SR and the status pages name it."""
    if settings.vlm_backend == SERVED:
        return settings.vlm_model or settings.vlm_served_model or "served-model"
    return settings.vlm_model


def api_key(settings: Settings) -> str:
    """The model server's key: the file (a mounted Secret) when configured, else the variable."""
    if settings.vlm_api_key_file is not None:
        path = Path(settings.vlm_api_key_file)
        try:
            return path.read_text().strip()
        except OSError as exc:
            from inference.vlm.errors import ModelConfigError

            raise ModelConfigError(f"vlm_api_key_file {path}: cannot read the model server's key ({exc.strerror})") from None
    return settings.vlm_api_key.get_secret_value()


@dataclass(frozen=True)
class _ModelChoice:
    """The settings that decide which model a worker loads (hashable: one model per choice)."""

    model: str
    models_root: str
    backend: str
    fallback: str
    on_engine_mismatch: str
    vision_batch: int
    max_batch_size: int
    max_wait_ms: float
    base_url: str = ""
    served_model: str = ""
    timeout_s: float = 120.0
    max_concurrency: int = 8

    @classmethod
    def of(cls, s: Settings) -> "_ModelChoice":
        return cls(s.vlm_model, str(s.models_root), s.vlm_backend, s.vlm_fallback_backend,
                   s.vlm_on_engine_mismatch, s.vlm_vision_batch, s.vlm_max_batch_size, s.vlm_max_wait_ms,
                   s.vlm_base_url, s.vlm_served_model, s.vlm_timeout_seconds, s.vlm_max_concurrency)


def load_configured_model(settings: Settings, warm_up: bool = True):
    """The VLM the settings name (also `dicom-node compare --vlm`)."""
    return _load(_ModelChoice.of(settings), api_key(settings), warm_up)


def _load(choice: _ModelChoice, key: str, warm_up: bool):
    from inference.vlm import BackendOptions, ServerOptions, load_model

    server = None
    if choice.backend == SERVED:
        server = ServerOptions(choice.base_url, choice.served_model, key, choice.timeout_s, choice.max_concurrency)
    options = BackendOptions(
        fallback=choice.fallback or None,
        on_engine_mismatch=choice.on_engine_mismatch,
        vision_batch=choice.vision_batch or None,
        server=server,
    )
    return load_model(choice.model, choice.models_root, backend=choice.backend, options=options, warm_up=warm_up)


_SERVED_LOCK = threading.Lock()  # the worker's threads must share one client (and its concurrency limit)


@functools.cache
def _served_model(choice: _ModelChoice, key: str):
    # Not warmed up here: a server that is down must fail the stage (retried), not poison the cache.
    return _load(choice, key, warm_up=False)


def _served(choice: _ModelChoice, key: str):
    with _SERVED_LOCK:
        return _served_model(choice, key)


_served.cache_clear = _served_model.cache_clear  # type: ignore[attr-defined]


@functools.cache
def _batcher(choice: _ModelChoice):
    from inference.vlm import Batcher

    model = _load(choice, "", warm_up=True)
    return Batcher(model.compare_many, max_batch_size=choice.max_batch_size, max_wait_s=choice.max_wait_ms / 1000)


def prompt_priors(prior_images: list, result) -> tuple:
    """The prior the analysis compared with and the older ones it measured on (oldest first), as the
    model is shown them; (None, ()) when the comparison was refused or there is no prior."""
    if not prior_images or result.refused:
        return None, ()
    by_source = {image.source: image for image in prior_images}
    compared = [by_source[s] for s in result.priors_compared if s in by_source]  # oldest first, the compared last
    if not compared:
        return prior_images[0], ()
    return compared[-1], tuple(compared[:-1])


def vlm_compare(settings: Settings, current, prior_images: list, result, prior_report: str | None,
                references: list | tuple = ()):
    """Model reading grounded on the measured regions; garbage output comes back flagged, never raised.
    A model server that is down or refuses the request raises (ModelServerUnavailable: retried by
    time; ModelServerRejected: the job fails with the server's message)."""
    from inference.vlm import CompareRequest

    prior, older = prompt_priors(prior_images, result)
    request = CompareRequest(current, prior, tuple(result.regions), prior_report=prior_report,
                             references=tuple(references) if prior is None else (),  # normals: (image, why matched)
                             older_priors=older)
    choice = _ModelChoice.of(settings)
    if choice.backend == SERVED:
        return _served(choice, api_key(settings)).compare_many([request])[0]
    return _batcher(choice).submit(request).result()


@dataclass
class OfflineReading:
    """`dicom-node compare --vlm`: the model's reading beside the measured regions (never instead of them)."""

    status: str  # "ok" | "unusable" (failed validation and repair) | "unavailable" (server down, model missing)
    model: str
    served_model: str = ""
    server_version: str = ""
    latency_s: float | None = None
    findings: list = field(default_factory=list)
    devices: list = field(default_factory=list)
    impression: str = ""
    priority: str = ""
    flags: list = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        head = f"model {self.model}: {self.status}" + (f" ({self.latency_s:.1f} s)" if self.latency_s is not None else "")
        if self.status == "unavailable":
            return f"{head}: {self.error}"
        lines = [head, f"  impression: {self.impression}"]
        lines += [f"  - {f['region']}: {f['finding']} {f['change']} ({f['source']})" for f in self.findings]
        return "\n".join(lines)


def offline_reading(settings: Settings, current, prior, result) -> OfflineReading:
    from inference.vlm import CompareRequest, VLMError

    name = vlm_model_name(settings)
    if not vlm_enabled(settings):
        return OfflineReading("unavailable", "", error="no model configured: set vlm_model, or vlm_backend=openai and vlm_base_url")
    t0 = time.perf_counter()
    try:
        model = load_configured_model(settings, warm_up=False)
        request = CompareRequest(current, None if result.refused else prior, tuple(result.regions))
        reading = model.compare_many([request])[0]
    except VLMError as exc:
        return OfflineReading("unavailable", name, latency_s=round(time.perf_counter() - t0, 3),
                              error=f"{type(exc).__name__}: {exc}")
    return OfflineReading("ok" if reading.usable else "unusable", reading.model or name, reading.served_model,
                          reading.server_version, reading.latency_s, [asdict(f) for f in reading.findings],
                          [asdict(d) for d in reading.devices], reading.impression, reading.priority, list(reading.flags))
