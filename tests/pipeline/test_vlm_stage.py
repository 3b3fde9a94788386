"""The pipeline's VLM step: concurrent comparisons from a threaded gpu worker share one batcher."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import inference
from dicom_node.config import Settings
from dicom_node.pipeline.vlm import _batcher, _ModelChoice, vlm_compare
from inference.phantoms import make_chest_pair
from inference.pixels import image_from_dataset
from inference.vlm.tiny import write_tiny_model


def test_concurrent_comparisons_are_batched(tmp_path):
    write_tiny_model(tmp_path, "gemma3", name="tiny-gemma")
    settings = Settings(vlm_model="tiny-gemma", models_root=tmp_path, vlm_max_batch_size=2, vlm_max_wait_ms=2000)
    pair = make_chest_pair(5, "new_nodule", size=256)
    current, prior = image_from_dataset(pair.current), image_from_dataset(pair.prior)
    result = inference.compare(current, [prior])
    batcher = _batcher(_ModelChoice.of(settings))
    sizes: list[int] = []
    run = batcher._run
    batcher._run = lambda batch: (sizes.append(len(batch)), run(batch))[1]  # observe the batch sizes
    with ThreadPoolExecutor(2) as pool:
        readings = list(pool.map(lambda _: vlm_compare(settings, current, [prior], result, "Lungs clear."), range(2)))
    assert sizes == [2]  # both requests ran as one batch
    assert all(r.mode == "comparison" for r in readings)
    # A random model writes garbage: each reading falls back to the measured region, flagged.
    assert all(r.findings and not r.usable for r in readings)


def test_backend_fallback_and_engine_policy_come_from_the_settings(tmp_path):
    """A gpu worker configured for TensorRT on a host without it: the fallback named in the
    settings serves, or, with none, loading fails with the reason instead of an ImportError."""
    from inference.vlm import BackendUnavailableError

    write_tiny_model(tmp_path, "gemma3", name="tiny-gemma")
    base = dict(vlm_model="tiny-gemma", models_root=tmp_path, vlm_backend="tensorrt", vlm_on_engine_mismatch="refuse")
    served = _batcher(_ModelChoice.of(Settings(**base, vlm_fallback_backend="onnxruntime", vlm_vision_batch=2)))
    backend = served._run.__self__.backend
    assert backend.name == "onnxruntime"
    assert backend.options.on_engine_mismatch == "refuse" and backend.images_per_run == 2
    served.close()
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        _batcher(_ModelChoice.of(Settings(**base)))


def test_the_model_is_shown_the_compared_prior_and_the_older_ones_oldest_first():
    from inference.phantoms import make_chest_history

    from dicom_node.pipeline.vlm import prompt_priors

    history = make_chest_history(4, "growing", visits=3, size=256)
    images = [image_from_dataset(ds, f"v{k}") for k, ds in enumerate(history.visits)]
    current, priors = images[-1], [images[1], images[0]]  # as retrieved: most recent first
    result = inference.compare(current, priors, with_overlay=False)
    assert result.priors_compared == ["v0", "v1"]
    prior, older = prompt_priors(priors, result)
    assert prior.source == "v1" and [o.source for o in older] == ["v0"]
    refused = inference.compare(current, [], with_overlay=False)
    assert prompt_priors([], refused) == (None, ())
