"""The VLM through a serving engine vs in process: one run, one table.

Builds a random model of the real architecture (Gemma 3 4B from its config; --tiny: a tiny one
on CPU), measures the in-process `torch` (eager) and `torch-compile` backends at batch 1 on
the same comparison, then starts a model server on the same weights and sends the comparison
through the `openai` backend at concurrency 1, 4 and 16. It reports comparisons/s, time to
first token (streamed), decode tokens/s, and each figure's ratio to in-process eager and to
the memory-bandwidth limit (LM weight bytes read per token / HBM bandwidth).

    python benchmarks/vlm_serving.py                          # GPU: transformers serve --device cuda
    python benchmarks/vlm_serving.py --engine-cmd "vllm serve {weights} --port {port} --served-model-name {name}" --ignore-eos
    python benchmarks/vlm_serving.py --engine-cmd "trtllm-serve {weights} --port {port}" --ignore-eos
    python benchmarks/vlm_serving.py --tiny                   # CPU smoke run (tiny random model)

{weights} {port} {name} in --engine-cmd are filled in. `transformers serve` generates one request
at a time for vision models (its continuous batching is for text-only models), so its
concurrency figures show the client's concurrency, not an engine's batching: the targets
(served c=16 >= 4x in-process eager comparisons/s; >= 50 % of the bandwidth limit at batch 1)
are for a real engine.

On a host with torch and transformers (e.g. torch 2.11, transformers 5.17) but nothing else of this
project, the extra wheels are those of transformers' `serving` extra plus Pillow, named one by one
so that pip leaves the installed torch and transformers alone:
    pip install openai pillow fastapi uvicorn pydantic starlette accelerate rich
(numpy, pyyaml and tokenizers come with transformers; with --engine-cmd only openai and pillow are
needed here). The script says what is missing before it starts and imports nothing from dicom_node.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NEEDED = {"openai": "openai", "PIL": "pillow", "yaml": "pyyaml", "numpy": "numpy", "fastapi": "fastapi",
          "uvicorn": "uvicorn", "pydantic": "pydantic", "starlette": "starlette", "accelerate": "accelerate", "rich": "rich"}
CONCURRENCY = (1, 4, 16)


def missing_wheels(engine_cmd: str | None) -> list[str]:
    need = dict(NEEDED)
    if engine_cmd:  # another engine: transformers serve's own dependencies are not needed
        for mod in ("fastapi", "uvicorn", "starlette", "accelerate", "rich"):
            need.pop(mod)
    return [wheel for mod, wheel in need.items() if importlib.util.find_spec(mod) is None]


def _inprocess_module():
    spec = importlib.util.spec_from_file_location("vlm_inprocess_bench", REPO / "benchmarks" / "vlm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: Path, name: str, port: int, engine_cmd: str | None, device: str, serve_args: str, log: Path):
    if engine_cmd:
        argv = shlex.split(engine_cmd.format(weights=weights, port=port, name=name))
    else:
        argv = [str(Path(sys.executable).with_name("transformers")), "serve", str(weights), "--device", device,
                "--host", "127.0.0.1", "--port", str(port), *shlex.split(serve_args)]
    print(f"starting model server: {' '.join(argv)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc, base_url: str, timeout: float, log: Path) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"model server exited {proc.returncode}; last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-20:]))
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as resp:
                data = json.load(resp)["data"]
                if data and data[0].get("status", {}).get("value", "loaded") == "loaded":
                    return [m["id"] for m in data]
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"model server not ready after {timeout:.0f} s (see {log})")


def served_level(backend, prompt, n: int, concurrency: int, new_tokens: int, extra: dict | None) -> dict:
    """n comparisons with `concurrency` in flight, each streamed (TTFT, per-request decode rate)."""
    def one(_):
        return backend.complete(prompt, new_tokens, stream=True, extra_body=extra)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    ttft = statistics.median(c.ttft_s for c in done if c.ttft_s is not None) if any(c.ttft_s for c in done) else None
    rates = [(c.completion_tokens - 1) / (c.latency_s - c.ttft_s) for c in done
             if c.ttft_s is not None and c.completion_tokens > 1 and c.latency_s > c.ttft_s]
    return {"concurrency": concurrency, "comparisons": n, "comparisons_s": n / wall, "ttft_s": ttft,
            "decode_tok_s": statistics.median(rates) if rates else None,
            "aggregate_tok_s": sum(c.completion_tokens for c in done) / wall,
            "new_tokens": statistics.median(c.completion_tokens for c in done),
            "served_model": done[0].served_model, "server_version": done[0].server_version}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (smoke run)")
    ap.add_argument("--layers", type=int, default=None, help="cut both towers to this many layers (dry run)")
    ap.add_argument("--engine-cmd", default=None, help="start this server instead of transformers serve ({weights} {port} {name})")
    ap.add_argument("--serve-args", default="", help="extra arguments for transformers serve (e.g. '--compile')")
    ap.add_argument("--served-model", default=None, help="the name the engine serves (default: the weights path, or {name})")
    ap.add_argument("--ignore-eos", action="store_true", help="ask the engine for exactly --new-tokens (vLLM, SGLang, trtllm-serve)")
    ap.add_argument("--backends", default="torch,torch-compile", help="in-process backends to compare with")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--per-level", type=int, default=1, help="comparisons per concurrency level: this x concurrency (at least 4)")
    ap.add_argument("--image-side", type=int, default=2048)
    ap.add_argument("--bandwidth-gbs", type=float, default=None)
    ap.add_argument("--server-timeout", type=float, default=600.0, help="seconds for the server to come up")
    ap.add_argument("--workdir", type=Path, default=None, help="keeps the random weights between runs")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    missing = missing_wheels(a.engine_cmd)
    if missing:
        raise SystemExit("missing wheels for this benchmark: pip install " + " ".join(missing))
    import torch

    from inference.vlm import BackendOptions, ServerOptions, VLM, VLMError, resolve_model
    from inference.vlm.adapters import make_adapter
    from inference.vlm.backends import backend_class
    from inference.vlm.backends.openai_backend import OpenAIBackend
    from inference.vlm.tiny import write_serving_files, write_tiny_model

    bench = _inprocess_module()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="vlm-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if a.tiny:
        folder = write_tiny_model(work, "gemma3", name="tiny-gemma3", max_new_tokens=a.new_tokens)
        side, compile_backend = min(a.image_side, 256), "eager"
    else:
        folder = work / bench.folder_name("gemma3-4b", a.layers)
        if not (folder / "model.yaml").is_file():
            print(f"writing random gemma3-4b weights to {folder} ...", flush=True)
            bench.write_real_size(work, "gemma3-4b", a.layers)
        side, compile_backend = a.image_side, "inductor"
    weights = write_serving_files(folder)
    spec = resolve_model(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    req = bench.request(side)

    # --- in process, batch 1 -------------------------------------------------------------
    adapter = make_adapter(spec)
    model = adapter.load_model(device, "bfloat16" if device == "cuda" else "float32")
    weight_bytes = bench.lm_weight_bytes(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    bw = bench.bandwidth_gbs(a.bandwidth_gbs)
    bound = bw * 1e9 / weight_bytes if bw else None
    inproc, skipped = {}, {}
    for name in a.backends.split(","):
        try:
            be = backend_class(name)(spec, BackendOptions(compile_backend=compile_backend)).adopt(adapter, model)
            r = bench.bench_backend(be, VLM(spec, be), req, a.new_tokens, a.reps)
            r["comparisons_s"] = 1.0 / r["s_per_comparison"]
            inproc[name] = r
            print(f"in process {name}: {json.dumps(r)}", flush=True)
        except VLMError as exc:
            skipped[name] = str(exc)
    prompt = VLM(spec, None).prompt(req)  # the same comparison for the server
    del model, adapter
    be = None
    if device == "cuda":
        torch.cuda.empty_cache()  # the server gets the GPU memory

    # --- served ---------------------------------------------------------------------------
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    log = work / "model-server.log"
    proc = start_server(weights, spec.name, port, a.engine_cmd, device, a.serve_args, log)
    levels = []
    try:
        names = wait_ready(proc, base_url, a.server_timeout, log)
        served_name = a.served_model or (names[0] if names else str(weights))
        print(f"model server ready after {time.perf_counter() - t_start:.0f} s (run so far), serving {names}", flush=True)
        extra = {"ignore_eos": True, "min_tokens": a.new_tokens} if a.ignore_eos else None
        for c in CONCURRENCY:
            backend = OpenAIBackend(spec, BackendOptions(server=ServerOptions(base_url, served_name, "", 600.0, c))).load()
            backend.complete(prompt, 4, stream=True, extra_body=extra)  # warm-up at this level's client
            level = served_level(backend, prompt, max(4, a.per_level * c), c, a.new_tokens, extra)
            levels.append(level)
            print(f"served c={c}: {json.dumps(level)}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    # --- table -----------------------------------------------------------------------------
    eager = inproc.get("torch")
    ratio = lambda v, ref: (v / ref) if v and ref else None  # noqa: E731
    fmt = lambda v, f: "n/a" if v is None else f % v  # noqa: E731
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    engine = a.engine_cmd.split()[0] if a.engine_cmd else f"transformers serve --device {device}"
    print(f"\nmodel {spec.name} ({'tiny, ' if a.tiny else ''}{dtype}), device {gpu}, engine {engine}, "
          f"{a.new_tokens} new tokens max{' (EOS ignored)' if a.ignore_eos else ''}, LM weights {weight_bytes / 1e9:.2f} GB, "
          f"bandwidth limit {fmt(bound, '%.1f tok/s')}, run {time.perf_counter() - t_start:.0f} s")
    print("| path | comparisons/s | x eager | TTFT s | decode tok/s | decode x eager | % of BW limit | aggregate tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(f"in process {n} (batch 1)", r) for n, r in inproc.items()] + [(f"served c={lv['concurrency']}", lv) for lv in levels]
    for label, r in rows:
        bw_pct = ratio(r["decode_tok_s"], bound)
        print(f"| {label} | {r['comparisons_s']:.3f} | {fmt(ratio(r['comparisons_s'], eager and eager['comparisons_s']), '%.2fx')} | "
              f"{fmt(r['ttft_s'], '%.3f')} | {fmt(r['decode_tok_s'], '%.1f')} | "
              f"{fmt(ratio(r['decode_tok_s'], eager and eager['decode_tok_s']), '%.2fx')} | "
              f"{fmt(bw_pct and 100 * bw_pct, '%.0f%%')} | {fmt(r.get('aggregate_tok_s'), '%.1f')} |")
    for name, why in skipped.items():
        print(f"| in process {name} | skipped: {why} |")
    if levels:
        print(f"served by {levels[0]['served_model']} ({levels[0]['server_version'] or 'no version reported'})")
    if a.out:
        a.out.write_text(json.dumps({"model": spec.name, "device": gpu, "engine": engine, "weight_bytes": weight_bytes,
                                     "bound_tok_s": bound, "in_process": inproc, "served": levels, "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
