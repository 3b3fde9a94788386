"""The VLM step of a comparison, when a model is configured (loaded once per worker process)."""

from __future__ import annotations

import functools

from ..config import Settings


@functools.cache
def _model(name: str, root: str, backend: str):
    from inference.vlm import load_model

    return load_model(name, root, backend=backend, warm_up=True)


def vlm_compare(settings: Settings, current, prior_images: list, result, priors: dict):
    """Model reading grounded on the measured regions; garbage output comes back flagged, never raised."""
    model = _model(settings.vlm_model, str(settings.models_root), settings.vlm_backend)
    prior = prior_images[0] if prior_images and not result.refused else None
    chosen = priors.get("chosen") or []
    report = chosen[0].get("report_text") if chosen else None
    return model.compare(current, prior, regions=result.regions, prior_report=report)
