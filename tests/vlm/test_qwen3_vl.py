"""Qwen3-VL specifics beyond the per-family tests: DeepStack features travel with the merged ones,
the prompt layout, and the clear refusal of a static-shape engine (dynamic resolution)."""

import pytest
import torch

from inference.vlm import BackendUnavailableError, CompareRequest, build_engine
from inference.vlm.spec import resolve_model

from .test_engine import H100, FakeBuilder


@pytest.fixture(scope="module")
def qwen3(torch_vlms):
    return torch_vlms["qwen3_vl"]


def _batch(vlm, req):
    ad = vlm.backend.adapter
    return ad, vlm.backend.model, ad.collate([ad.encode(vlm.prompt(req))])


def test_encoder_outputs_equal_the_models_own_pixel_path(qwen3, pair, regions):
    """Our split (vision features -> mm_encoder_outputs, DeepStack included) is what the model does itself."""
    prior, current = pair
    ad, model, b = _batch(qwen3, CompareRequest(current, prior, tuple(regions)))
    with torch.inference_mode():
        feats = ad.vision_features(model, b.pixel_values, b.image_grid_thw)
        ours = model(**b.generate_kwargs, mm_encoder_outputs=ad.as_encoder_outputs(feats, b.image_grid_thw)).logits
        own = model(**b.generate_kwargs, pixel_values=b.pixel_values).logits
    n_deep = len(model.config.vision_config.deepstack_visual_indexes)
    assert n_deep > 0 and feats.shape[-1] == (1 + n_deep) * model.config.text_config.hidden_size
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5)


def test_deepstack_features_reach_the_language_model(qwen3, pair, regions):
    prior, current = pair
    ad, model, b = _batch(qwen3, CompareRequest(current, prior, tuple(regions)))
    h = model.config.text_config.hidden_size
    with torch.inference_mode():
        feats = ad.vision_features(model, b.pixel_values, b.image_grid_thw)
        no_deep = feats.clone()
        no_deep[:, h:] = 0
        full = model(**b.generate_kwargs, mm_encoder_outputs=ad.as_encoder_outputs(feats, b.image_grid_thw)).logits
        cut = model(**b.generate_kwargs, mm_encoder_outputs=ad.as_encoder_outputs(no_deep, b.image_grid_thw)).logits
    assert (full[0, -1] - cut[0, -1]).abs().max() > 1e-4


def test_prompt_layout(qwen3, pair, regions):
    prior, current = pair
    ad = qwen3.backend.adapter
    enc = ad.encode(qwen3.prompt(CompareRequest(current, prior, tuple(regions))))
    tok, cfg = ad.tokenizer, ad.config
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "system" not in text.split("<|im_start|>user")[0]
    n_images = enc.image_grid_thw.shape[0]
    assert enc.input_ids.count(cfg.vision_start_token_id) == enc.input_ids.count(cfg.vision_end_token_id) == n_images
    # Placeholder runs sit between start/end, one per image, of grid/merge^2 tokens each.
    runs, i = [], 0
    while i < len(enc.input_ids):
        if enc.input_ids[i] == cfg.vision_start_token_id:
            j = enc.input_ids.index(cfg.vision_end_token_id, i)
            assert set(enc.input_ids[i + 1 : j]) == {cfg.image_token_id}
            runs.append(j - i - 1)
            i = j
        i += 1
    assert runs == (enc.image_grid_thw.prod(-1) // 4).tolist()
    # Crops (budget crop_size^2) are smaller than the full images (budget image_size^2).
    assert runs[0] > runs[-1]


def test_no_tensorrt_engine_for_dynamic_resolution(models_root):
    with pytest.raises(BackendUnavailableError, match="dynamic resolution"):
        build_engine(resolve_model("tiny-qwen3_vl", models_root), builder=FakeBuilder(), platform=H100)
