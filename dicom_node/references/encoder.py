"""The second descriptor references are matched by: the configured model's vision encoder.

`references.descriptor`:
- `auto` (default): the vision encoder's embedding when the node runs a local model (`vlm_model`
  with backend torch, onnxruntime or tensorrt: the weights are on this machine), otherwise none;
  a model that cannot be loaded is logged and matching uses the thumbnail; it is tried again after
  RETRY_FAILED_LOAD_SECONDS, not on every job;
- `vision_encoder`: the same, but required: without a loadable local model this is an error;
- `thumbnail`: the lightweight thumbnail only.
The thumbnail is always stored and computed as well, so a library imported without a model (or with
another one) still matches: references whose encoder kind differs from the query's are compared by
thumbnail (inference.references.descriptor).
"""

from __future__ import annotations

import functools
import logging
import time

from ..logs import log_event
from .library import ReferenceRefused

log = logging.getLogger(__name__)

RETRY_FAILED_LOAD_SECONDS = 600.0  # a model that failed to load is tried again after this (auto)


class EncoderUnavailable(ReferenceRefused):
    """references.descriptor is vision_encoder but the local model's encoder cannot be loaded."""


def encoder_for(settings):
    """A callable `ImageInput -> vector` with a `kind`, or None (thumbnail only). Settings refuse
    vision_encoder without a local model (config.py), so here only loading can fail."""
    if settings.references.descriptor == "thumbnail" or not settings.runs_local_model:
        return None
    key = (settings.vlm_model, str(settings.models_root))
    failed_at = _failed_loads.get(key)
    if failed_at is not None and settings.references.descriptor == "auto" and time.monotonic() - failed_at < RETRY_FAILED_LOAD_SECONDS:
        return None  # logged when it failed: neither loaded nor logged again for every job
    try:
        encoder = _load(*key)
    except Exception as exc:
        if settings.references.descriptor == "vision_encoder":
            raise EncoderUnavailable(f"references.descriptor is vision_encoder, but model {settings.vlm_model!r} "
                                     f"cannot be loaded: {exc}") from exc
        log_event(log, logging.WARNING, "references.encoder_unavailable", model=settings.vlm_model, detail=str(exc),
                  retry_after_seconds=RETRY_FAILED_LOAD_SECONDS)
        _failed_loads[key] = time.monotonic()
        return None
    _failed_loads.pop(key, None)
    return encoder


_failed_loads: dict[tuple[str, str], float] = {}  # (model, models_root) -> when its load last failed (monotonic)


@functools.lru_cache(maxsize=2)
def _load(model: str, models_root: str):
    from inference.vlm.spec import resolve_model
    from inference.vlm.vision_descriptor import VisionEncoderDescriptor

    return VisionEncoderDescriptor(resolve_model(model, models_root))
