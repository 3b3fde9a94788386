"""Tiny random models of the real architectures, for CPU tests and the benchmark's --tiny mode.

Nothing is downloaded: the tokenizer is trained here with `tokenizers`, the weights are random.
The written folder is a normal model-repository entry (model.yaml + weights/), so it is loaded
through exactly the same path as a production model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .prompting import PROMPTS_DIR

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _corpus() -> list[str]:
    # Prompt templates and JSON output vocabulary: enough to get sensible merges.
    text = [p.read_text() for p in PROMPTS_DIR.glob("*.yaml")]
    text.append('{"findings": [{"finding": "pleural effusion", "region": "left costophrenic angle", '
                '"change": "worsened", "severity": "moderate", "evidence": "blunting", "confidence": 0.8}], '
                '"devices": [{"device": "endotracheal tube", "status": "unchanged"}], '
                '"impression": "Increased left effusion.", "priority": "urgent"}')
    return text * 4


def train_tokenizer(out_dir: Path, specials: list[str], vocab_size: int = 512, **named: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.save_pretrained(out_dir)
    return fast


def _gemma3(wdir: Path, image_size: int) -> dict[str, Any]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tok = train_tokenizer(wdir, GEMMA_SPECIALS, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS}
    cfg = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                         sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=4096, pad_token_id=ids["<pad>"],
                         eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=4),
        mm_tokens_per_image=16, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(0)
    _randomise_zeros(Gemma3ForConditionalGeneration(cfg)).save_pretrained(wdir)
    return {"image_size": image_size, "crop_size": image_size}


def _qwen2_5_vl(wdir: Path, image_size: int) -> dict[str, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = train_tokenizer(wdir, QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    _randomise_zeros(Qwen2_5_VLForConditionalGeneration(cfg)).save_pretrained(wdir)
    return {"image_size": image_size, "crop_size": image_size // 2}


def _qwen3_vl(wdir: Path, image_size: int) -> dict[str, Any]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = train_tokenizer(wdir, QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = Qwen3VLConfig(
        # head_dim 32 -> 16 rotary pairs split t/h/w like the real [24, 20, 20] of 64, interleaved.
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                          "mrope_interleaved": True},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        # 8x8 learned position grid (interpolated per image); DeepStack from both vision layers.
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    _randomise_zeros(Qwen3VLForConditionalGeneration(cfg)).save_pretrained(wdir)
    return {"image_size": image_size, "crop_size": image_size // 2}


def _randomise_zeros(model: torch.nn.Module) -> torch.nn.Module:
    # Some weights initialise to zero (Gemma 3's projector): random ones make outputs informative,
    # so a broken export or a dropped image would change them.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 0.05)
    return model


_BUILDERS = {"gemma3": _gemma3, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl}


def write_tiny_model(models_root: str | Path, family: str, name: str | None = None, image_size: int = 32,
                     max_new_tokens: int = 24, **yaml_extra: Any) -> Path:
    """models_root/<name>/{model.yaml, weights/} with a tiny random model of `family`."""
    folder = Path(models_root) / (name or f"tiny-{family}")
    wdir = folder / "weights"
    wdir.mkdir(parents=True, exist_ok=True)
    sizes = _BUILDERS[family](wdir, image_size)
    doc = {"name": folder.name, "family": family, "weights": "weights", "dtype": "float32",
           "prompt_set": "chest_compare_v1", "max_new_tokens": max_new_tokens, "max_regions": 2, **sizes,
           "engine": {"precision": "fp16", "profiles": {"vision": {"min_batch": 1, "opt_batch": 6, "max_batch": 12}}},
           **yaml_extra}
    (folder / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


# Gemma's turn markup with OpenAI-style content lists (text and image items), for a model server.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def write_serving_files(folder: str | Path) -> Path:
    """Add what a model server loads beside the weights (a Gemma 3 processor: image processor, the
    tokenizer's image tokens and a chat template), so `transformers serve <weights>` can serve the
    tiny model; the in-process adapters do not need these. Returns the weights directory."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    wdir = Path(folder) / "weights"
    cfg = Gemma3Config.from_pretrained(wdir)
    tok = AutoTokenizer.from_pretrained(wdir, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    side = int(cfg.vision_config.image_size)
    images = Gemma3ImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": side, "width": side})
    Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=GEMMA_CHAT_TEMPLATE,
                    image_seq_length=int(cfg.mm_tokens_per_image)).save_pretrained(wdir)
    return wdir
