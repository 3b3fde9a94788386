"""The whole comparison through each adapter: two images + crop pairs -> structured result."""

import dataclasses

import numpy as np
import pytest
import torch

from inference.vlm import CompareRequest
from inference.vlm.schema import FLAG_BACKEND_ERROR, FLAG_SINGLE_IMAGE, FLAG_UNUSABLE

from .conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_compare_end_to_end(torch_vlms, family, pair, regions):
    vlm = torch_vlms[family]
    prior, current = pair
    res = vlm.compare(current, prior, regions, prior_report="Small left effusion.", indication="dyspnoea")
    assert res.mode == "comparison" and res.model == f"tiny-{family}" and res.prompt_set == "chest_compare_v1@1.0.0"
    assert vlm.backend.last.new_tokens > 0 and res.raw_output != ""
    # A random model writes garbage: the result is the measured fallback, flagged, never an exception.
    assert FLAG_UNUSABLE in res.flags and [f.region for f in res.findings] == [r.zone for r in regions]
    assert res.to_dict()["flags"] == res.flags


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholders_match_images(torch_vlms, family, pair, regions):
    vlm = torch_vlms[family]
    prior, current = pair
    ad = vlm.backend.adapter
    enc = ad.encode(vlm.prompt(CompareRequest(current, prior, tuple(regions))))
    n_images = 2 + 2 * vlm.spec.max_regions
    feats = ad.vision_features(vlm.backend.model, enc.pixel_values, enc.image_grid_thw)
    assert sum(enc.image_token_mask) == feats.reshape(-1, feats.shape[-1]).shape[0] > 0
    if family == "gemma3":
        assert enc.pixel_values.shape[0] == n_images and sum(enc.image_token_mask) == n_images * 16
    else:
        assert enc.image_grid_thw.shape[0] == n_images


def _last_logits(vlm, req):
    ad, model = vlm.backend.adapter, vlm.backend.model
    b = ad.collate([ad.encode(vlm.prompt(req))])
    with torch.inference_mode():
        feats = ad.vision_features(model, b.pixel_values, b.image_grid_thw)
        out = model(**b.generate_kwargs, mm_encoder_outputs=ad.as_encoder_outputs(feats, b.image_grid_thw))
    return out.logits[0, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_prior_image_reaches_language_model(torch_vlms, family, pair, regions):
    vlm = torch_vlms[family]
    prior, current = pair
    base = _last_logits(vlm, CompareRequest(current, prior, tuple(regions)))
    same = _last_logits(vlm, CompareRequest(current, prior, tuple(regions)))
    flipped = dataclasses.replace(prior, pixels=np.ascontiguousarray(prior.pixels[::-1, ::-1]))
    changed = _last_logits(vlm, CompareRequest(current, flipped, tuple(regions)))
    assert torch.equal(base, same)
    assert (base - changed).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single(torch_vlms, family, pair, regions):
    """Left padding and per-request image bookkeeping: a batch gives each request its own answer."""
    vlm = torch_vlms[family]
    prior, current = pair
    reqs = [CompareRequest(current, prior, tuple(regions)), CompareRequest(current, None)]
    prompts = [vlm.prompt(r) for r in reqs]
    batched = vlm.backend.run_batch(prompts, max_new_tokens=6, ignore_eos=True)
    singles = [vlm.backend.run_batch([p], max_new_tokens=6, ignore_eos=True)[0] for p in prompts]
    assert batched == singles


def test_single_image_mode_result(torch_vlms, pair):
    vlm = torch_vlms["gemma3"]
    _, current = pair
    res = vlm.compare(current, None, [], indication="fever")
    assert res.mode == "single_image" and res.flags[0] == FLAG_SINGLE_IMAGE


class _Scripted:
    """Backend stand-in returning fixed model text (or raising), to drive the output path."""

    name = "scripted"

    def __init__(self, outputs):
        self.outputs = outputs

    def run_batch(self, prompts, max_new_tokens=None, ignore_eos=False):
        if isinstance(self.outputs, Exception):
            raise self.outputs
        return self.outputs[: len(prompts)]


def _with_backend(vlm, backend):
    return type(vlm)(vlm.spec, backend, vlm.prompt_set)


def test_model_garbage_and_truncation_never_raise(torch_vlms, pair, regions):
    prior, current = pair
    good = '{"findings": [{"finding": "effusion", "region": "left costophrenic angle", "change": "increased", ' \
           '"severity": "moderate", "evidence": "blunted angle", "confidence": 0.7}], "devices": [], ' \
           '"impression": "Effusion increased.", "priority": "urgent"}'
    vlm = _with_backend(torch_vlms["gemma3"], _Scripted([good, good[:70], "\x00\xff{{{[[", ""]))
    reqs = [CompareRequest(current, prior, tuple(regions))] * 4
    ok, trunc, junk, empty = vlm.compare_many(reqs)
    assert ok.usable and ok.findings[0].change == "worsened" and ok.priority == "urgent"
    assert trunc.usable and "vlm_output_repaired" in trunc.flags and trunc.findings[0].finding == "effusion"
    for r in (junk, empty):
        assert not r.usable and r.findings[0].source == "measurement"


def test_backend_failure_gives_flagged_fallback(torch_vlms, pair, regions):
    prior, current = pair
    vlm = _with_backend(torch_vlms["gemma3"], _Scripted(RuntimeError("CUDA out of memory")))
    res = vlm.compare(current, prior, regions)
    assert FLAG_UNUSABLE in res.flags and FLAG_BACKEND_ERROR in res.flags
    assert "CUDA out of memory" in res.raw_output
    assert res.findings[0].region == "right lower zone" and res.findings[0].source == "measurement"
