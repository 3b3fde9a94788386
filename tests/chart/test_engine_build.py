"""The engine-build Job's script and the model server's wait, run for real in sh on a cache
directory: built once per key into <key>.partial then renamed, reused when present, and a failed
build leaves nothing the server would take for an engine."""

from __future__ import annotations

import os
import subprocess

from .helm import find, render
from .value_sets import merged, value_sets


def _job_and_wait(script: str) -> tuple[dict, str, dict]:
    docs = render(merged(value_sets()["model-server-trtllm"], {"modelServer": {"engineBuild": {"script": script}}}))
    job = find(docs, "Job", "")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    wait = find(docs, "Deployment", "-model-server")["spec"]["template"]["spec"]["initContainers"][0]
    return container, env["ENGINE_KEY"], {"command": wait["command"], "env": {e["name"]: e["value"] for e in wait["env"]}}


def _run(container: dict, cache, weights) -> subprocess.CompletedProcess:
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(CACHE_DIR=str(cache), WEIGHTS_DIR=str(weights), PATH=os.environ["PATH"])
    return subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True, timeout=60)


def test_engine_is_built_once_per_key_and_reused(tmp_path):
    cache, weights = tmp_path / "cache", tmp_path / "weights"
    cache.mkdir()
    weights.mkdir()
    (weights / "model.bin").write_text("w")
    # A stand-in for trtllm-build: writes the engine where it is told, and counts its runs.
    script = f'echo built >> "{tmp_path}/runs"; cp "$WEIGHTS_DIR/model.bin" "$ENGINE_DIR/rank0.engine"'
    container, key, wait = _job_and_wait(script)
    first = _run(container, cache, weights)
    assert first.returncode == 0, first.stderr
    engine = cache / "engines" / key
    assert (engine / ".complete").exists() and (engine / "rank0.engine").read_text() == "w"
    assert '"gpu": "NVIDIA-H200"' in (engine / "key.json").read_text()
    assert not (cache / "engines" / f"{key}.partial").exists()
    second = _run(container, cache, weights)
    assert second.returncode == 0 and "already built" in second.stdout
    assert (tmp_path / "runs").read_text().splitlines() == ["built"]
    # The server's init container passes once the engine is complete.
    done = subprocess.run(wait["command"], env={**wait["env"], "ENGINE_DIR": str(engine), "PATH": os.environ["PATH"]},
                          capture_output=True, timeout=10)
    assert done.returncode == 0


def test_a_failed_build_leaves_no_engine_and_the_server_keeps_waiting(tmp_path):
    cache, weights = tmp_path / "cache", tmp_path / "weights"
    cache.mkdir()
    weights.mkdir()
    container, key, wait = _job_and_wait('echo half > "$ENGINE_DIR/rank0.engine"; exit 3')
    failed = _run(container, cache, weights)
    assert failed.returncode != 0
    assert not (cache / "engines" / key).exists()
    try:
        subprocess.run(wait["command"], env={"ENGINE_DIR": str(cache / "engines" / key), "PATH": os.environ["PATH"]},
                       capture_output=True, timeout=3)
        raise AssertionError("the wait ended without an engine")
    except subprocess.TimeoutExpired:
        pass  # still waiting, as it should
