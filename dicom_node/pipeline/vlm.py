"""The VLM step of a comparison, when a model is configured.

The model is loaded once per worker process. Requests go through a micro-batcher: with a
threaded gpu worker (`dicom-node worker -Q gpu --pool threads -c 4`) concurrent comparisons
run as one batch of up to `vlm_max_batch_size`; with the default prefork pool, batches of one.
"""

from __future__ import annotations

import functools

from ..config import Settings


@functools.cache
def _batcher(name: str, root: str, backend: str, max_batch_size: int, max_wait_ms: float):
    from inference.vlm import Batcher, load_model

    model = load_model(name, root, backend=backend, warm_up=True)
    return Batcher(model.compare_many, max_batch_size=max_batch_size, max_wait_s=max_wait_ms / 1000)


def vlm_compare(settings: Settings, current, prior_images: list, result, priors: dict):
    """Model reading grounded on the measured regions; garbage output comes back flagged, never raised."""
    from inference.vlm import CompareRequest

    batcher = _batcher(settings.vlm_model, str(settings.models_root), settings.vlm_backend,
                       settings.vlm_max_batch_size, settings.vlm_max_wait_ms)
    prior = prior_images[0] if prior_images and not result.refused else None
    chosen = priors.get("chosen") or []
    report = chosen[0].get("report_text") if chosen else None
    request = CompareRequest(current, prior, tuple(result.regions), prior_report=report)
    return batcher.submit(request).result()
