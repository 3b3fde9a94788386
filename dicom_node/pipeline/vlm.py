"""The VLM step of a comparison, when a model is configured.

The model is loaded once per worker process. Requests go through a micro-batcher: with a
threaded gpu worker (`dicom-node worker -Q gpu --pool threads -c 4`) concurrent comparisons
run as one batch of up to `vlm_max_batch_size`; with the default prefork pool, batches of one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..config import Settings


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

    @classmethod
    def of(cls, s: Settings) -> "_ModelChoice":
        return cls(s.vlm_model, str(s.models_root), s.vlm_backend, s.vlm_fallback_backend,
                   s.vlm_on_engine_mismatch, s.vlm_vision_batch, s.vlm_max_batch_size, s.vlm_max_wait_ms)


@functools.cache
def _batcher(choice: _ModelChoice):
    from inference.vlm import BackendOptions, Batcher, load_model

    options = BackendOptions(
        fallback=choice.fallback or None,
        on_engine_mismatch=choice.on_engine_mismatch,
        vision_batch=choice.vision_batch or None,
    )
    model = load_model(choice.model, choice.models_root, backend=choice.backend, options=options, warm_up=True)
    return Batcher(model.compare_many, max_batch_size=choice.max_batch_size, max_wait_s=choice.max_wait_ms / 1000)


def vlm_compare(settings: Settings, current, prior_images: list, result, prior_report: str | None):
    """Model reading grounded on the measured regions; garbage output comes back flagged, never raised."""
    from inference.vlm import CompareRequest

    batcher = _batcher(_ModelChoice.of(settings))
    prior = prior_images[0] if prior_images and not result.refused else None
    request = CompareRequest(current, prior, tuple(result.regions), prior_report=prior_report)
    return batcher.submit(request).result()
