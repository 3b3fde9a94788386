"""VLM backend benchmark: a real-size architecture with random weights, every available backend.

Measures per backend at batch 1: vision-encoder ms (all images of one comparison), time to first
token, decode tokens/s, seconds per comparison (2 images + 2 crop pairs, 256 new tokens, EOS
ignored), and the ratios to torch eager and to the memory-bandwidth limit
(LM weight bytes read per token / GPU memory bandwidth).

    python benchmarks/vlm.py --config gemma3-4b            # on an NVIDIA GPU (bf16)
    python benchmarks/vlm.py --tiny                        # CPU smoke run with a tiny model
    python benchmarks/vlm.py --layers 2 --new-tokens 8     # CPU dry run: real widths, 2 layers
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.types import ChangeRegion, ImageInput  # noqa: E402
from inference.vlm import BackendOptions, CompareRequest, VLM, VLMError, resolve_model  # noqa: E402
from inference.vlm.adapters import make_adapter  # noqa: E402
from inference.vlm.backends import IN_PROCESS, backend_class  # noqa: E402
from inference.vlm.tiny import GEMMA_SPECIALS, train_tokenizer, write_tiny_model  # noqa: E402

# google/gemma-3-4b-it architecture (random weights; special-token ids remapped to the small tokenizer).
GEMMA3_4B = {
    "text_config": dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=1024, max_position_embeddings=131_072),
    "vision_config": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                          num_hidden_layers=27, num_attention_heads=16, image_size=896, patch_size=14,
                          vision_use_head=False),
    "mm_tokens_per_image": 256,
}
CONFIGS = {"gemma3-4b": GEMMA3_4B}
# Peak HBM bandwidth, GB/s, by device-name substring (first match wins).
BANDWIDTH_GBS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
                 ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0)]


def folder_name(config: str, layers: int | None) -> str:
    return config if layers is None else f"{config}-{layers}layers"


def write_real_size(root: Path, config: str, layers: int | None = None) -> Path:
    """A model-repository entry with the real architecture and random bf16 weights.

    `layers` keeps every width but cuts the depth of both towers: a dry run on a CPU checks
    the whole path (config, save, load, export, prompt) at real tensor shapes in minutes.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    name = folder_name(config, layers)
    folder = root / name
    wdir = folder / "weights"
    wdir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(wdir, GEMMA_SPECIALS, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS}
    c = CONFIGS[config]
    depth = {"num_hidden_layers": layers} if layers else {}
    cfg = Gemma3Config(
        text_config={**c["text_config"], **depth, "pad_token_id": ids["<pad>"], "eos_token_id": ids["<eos>"], "bos_token_id": ids["<bos>"]},
        vision_config={**c["vision_config"], **depth}, mm_tokens_per_image=c["mm_tokens_per_image"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(wdir)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    (folder / "model.yaml").write_text(
        f"name: {name}\nfamily: gemma3\nweights: weights\ndtype: bfloat16\nimage_size: 896\ncrop_size: 448\n"
        "max_regions: 2\nmax_new_tokens: 256\nengine:\n  precision: bf16\n  profiles:\n"
        "    vision: {min_batch: 1, opt_batch: 6, max_batch: 12}\n"
    )
    return folder


def request(side: int) -> CompareRequest:
    rng = np.random.default_rng(0)
    prior = rng.normal(100, 20, (side, side)).astype(np.float32)
    current = prior.copy()
    current[side // 2 : side // 2 + side // 8, side // 8 : side // 4] += 60.0
    mk = lambda px, d: ImageInput(px, (0.15, 0.15), modality="CR", body_part="CHEST", view="PA", acquired_on=d)  # noqa: E731
    s = side // 8
    regions = (
        ChangeRegion("right lower zone", (side // 2, side // 8, side // 2 + s, side // 4), 900.0, 40.0, 0.5, "worsened", 0.9),
        ChangeRegion("left hilum", (side // 3, side // 2, side // 3 + s // 2, side // 2 + s // 2), 200.0, 15.0, -0.2, "improved", 0.6),
    )
    return CompareRequest(mk(current, dt.date(2024, 3, 1)), mk(prior, dt.date(2023, 9, 1)), regions, "Prior: clear lungs.", "cough")


def lm_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decode step: the language model and the output projection."""
    lm = model.model.language_model
    n = sum(p.numel() * p.element_size() for p in lm.parameters())
    emb = lm.embed_tokens.weight
    n -= emb.numel() * emb.element_size()  # the embedding is gathered, not streamed...
    head = model.lm_head.weight
    return n + head.numel() * head.element_size()  # ...but the (tied) head is read whole


def bandwidth_gbs(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((bw for key, bw in BANDWIDTH_GBS if key in name), None)


def _timed(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def bench_backend(backend, vlm: VLM, req: CompareRequest, new_tokens: int, reps: int) -> dict:
    prompt = vlm.prompt(req)
    ad = backend.adapter
    enc = ad.encode(prompt)
    backend.run_batch([prompt], max_new_tokens=4, ignore_eos=True)  # warm-up: lazy init, compile, engine
    backend.run_batch([prompt], max_new_tokens=new_tokens, ignore_eos=True)  # static-cache sizes for the long run
    vision_s = _timed(lambda: backend.encode_images(enc.pixel_values, enc.image_grid_thw), reps)
    ttft = _timed(lambda: backend.run_batch([prompt], max_new_tokens=1, ignore_eos=True), reps)
    total = _timed(lambda: backend.run_batch([prompt], max_new_tokens=new_tokens, ignore_eos=True), reps)
    # Decode rate from the difference of two medians; on a noisy host a short run can come out
    # faster than its first token alone: reported as n/a rather than as an absurd rate.
    decode_tps = (new_tokens - 1) / (total - ttft) if total > ttft else None
    return {"images": int(enc.pixel_values.shape[0]), "prompt_tokens": len(enc.input_ids),
            "vision_ms": vision_s * 1e3, "ttft_s": ttft, "decode_tok_s": decode_tps, "s_per_comparison": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="gemma3-4b")
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (smoke run)")
    ap.add_argument("--layers", type=int, default=None, help="cut both towers to this many layers (dry run)")
    ap.add_argument("--backends", default=",".join(IN_PROCESS))  # served: benchmarks/vlm_serving.py
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--image-side", type=int, default=2048, help="synthetic radiograph size in pixels")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; eager with --tiny)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="override the GPU memory bandwidth")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    work = a.workdir or Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    if a.tiny:
        folder = write_tiny_model(work, "gemma3", name="tiny-gemma3", max_new_tokens=a.new_tokens)
        compile_backend = a.compile_backend or "eager"
        side = min(a.image_side, 256)
    else:
        name = folder_name(a.config, a.layers)
        folder = work / name
        if not (folder / "model.yaml").is_file():
            print(f"writing random {name} weights to {folder} ...", flush=True)
            write_real_size(work, a.config, a.layers)
        compile_backend = a.compile_backend or "inductor"
        side = a.image_side
    spec = resolve_model(folder)
    opts = BackendOptions(compile_backend=compile_backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = make_adapter(spec)
    model = adapter.load_model(device, "bfloat16" if device == "cuda" else "float32")
    weight_bytes = lm_weight_bytes(model)
    bw = bandwidth_gbs(a.bandwidth_gbs)
    bound_tps = bw * 1e9 / weight_bytes if bw else None
    req = request(side)

    rows, skipped = {}, {}
    for name in a.backends.split(","):
        try:
            be = backend_class(name)(spec, opts)
            if name == "tensorrt":  # adopt() skips load(): check library and GPU the same way
                from inference.vlm.engine import import_tensorrt

                be.trt = import_tensorrt()
                if device != "cuda":
                    raise VLMError("the tensorrt backend needs an NVIDIA GPU")
                be.choose_lm_compiler()
            be.adopt(adapter, model)
            rows[name] = bench_backend(be, VLM(spec, be), req, a.new_tokens, a.reps)
            rows[name]["language_model"] = be.language_model_compiler()
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
        except VLMError as exc:
            skipped[name] = str(exc)
            print(f"{name}: skipped: {exc}", flush=True)

    base = rows.get("torch")
    for r in rows.values():
        r["decode_vs_eager"] = r["decode_tok_s"] / base["decode_tok_s"] if base and base["decode_tok_s"] and r["decode_tok_s"] else None
        r["comparison_speedup_vs_eager"] = base["s_per_comparison"] / r["s_per_comparison"] if base else None
        r["decode_vs_bandwidth_limit"] = r["decode_tok_s"] / bound_tps if bound_tps and r["decode_tok_s"] else None

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"\nmodel {spec.name} ({'tiny, ' if a.tiny else ''}{dtype}), device {gpu}, batch 1, "
          f"{a.new_tokens} new tokens (EOS ignored), LM weights {weight_bytes / 1e9:.2f} GB, "
          f"bandwidth limit {'%.1f tok/s' % bound_tps if bound_tps else 'n/a (no GPU bandwidth known)'}")
    print("(prompt text is tokenized by a small tokenizer trained on the prompt templates: more text tokens "
          "than the model's own tokenizer gives, so TTFT errs high)")
    print("| backend | images | prompt tok | vision ms | TTFT s | decode tok/s | s/comparison | decode x eager | comparison x eager | % of BW limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "n/a" if v is None else f % v  # noqa: E731
    for name, r in rows.items():
        print(f"| {name} | {r['images']} | {r['prompt_tokens']} | {r['vision_ms']:.1f} | {r['ttft_s']:.3f} | "
              f"{fmt(r['decode_tok_s'], '%.1f')} | {r['s_per_comparison']:.2f} | {fmt(r['decode_vs_eager'], '%.2fx')} | "
              f"{fmt(r['comparison_speedup_vs_eager'], '%.2fx')} | {fmt(r['decode_vs_bandwidth_limit'] and 100 * r['decode_vs_bandwidth_limit'], '%.0f%%')} |")
    print("language model compiled by: " + ", ".join(f"{n}: {r['language_model']}" for n, r in rows.items()))
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} |")
    if a.out:
        a.out.write_text(json.dumps({"model": spec.name, "device": gpu, "weight_bytes": weight_bytes,
                                     "bandwidth_gbs": bw, "bound_tok_s": bound_tps, "results": rows, "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
