"""The `openai` backend against a real OpenAI-compatible server (`transformers serve`, tiny random
Gemma 3 on CPU) behind a recording proxy: the request, structured output ignored, garbage and
repairable answers, a server down, slow, busy or refusing, and concurrency."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from PIL import Image

from dicom_node.config import Settings
from dicom_node.pipeline.retry import PERMANENT, TRANSIENT, classify
from dicom_node.pipeline.vlm import _ModelChoice, _served, load_configured_model, vlm_compare
from inference.vlm import BackendOptions, ModelServerRejected, ModelServerUnavailable, ServerOptions, load_model
from inference.vlm.backends.openai_backend import response_format
from inference.vlm.schema import FLAG_REPAIRED, FLAG_UNUSABLE


GOOD = json.dumps({
    "findings": [{"finding": "consolidation", "region": "right lower zone", "change": "increased",
                  "severity": "moderate", "evidence": "new opacity", "confidence": 0.8}],
    "devices": [], "impression": "Right lower zone consolidation, worse.", "priority": "urgent"})


def served_vlm(served, base_url=None, served_model=None, timeout=60.0, concurrency=4, key=""):
    server = ServerOptions(base_url or served.proxy.base_url, served_model or served.server.served_model, key, timeout, concurrency)
    return load_model(served.folder, backend="openai", options=BackendOptions(server=server))


def settings_for(served, tmp_path, **extra) -> Settings:
    return Settings(vlm_backend="openai", vlm_base_url=served.proxy.base_url, vlm_served_model=served.server.served_model,
                    work_dir=tmp_path / "jobs", **extra)


def png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_the_request_carries_the_comparison_and_a_server_that_ignores_the_schema_still_gets_validated(served, pair, regions):
    prior, current = pair
    reading = served_vlm(served).compare(current, prior, regions, prior_report="Small right effusion.",
                                         indication="Cough, fever")
    (body,) = served.proxy.requests
    system, user = body["messages"]
    assert system["role"] == "system" and "comparing a patient's current CR CHEST study" in system["content"]
    texts = " ".join(part["text"] for part in user["content"] if part["type"] == "text")
    for expected in ("2024-01-10", "2024-03-20", "PA", "70 days", "right lower zone", "Small right effusion.", "Cough, fever"):
        assert expected in texts, expected
    images = [png(part["image_url"]["url"]) for part in user["content"] if part["type"] == "image_url"]
    # prior, current, then one zoomed crop pair for each of the max_regions (2) most significant regions
    assert len(images) == 2 + 2 * 2
    # full images scaled to the model's image_size (32 here), aspect kept; crops zoomed to crop_size
    assert images[0].size == (27, 32) and all(im.size == (32, 32) for im in images[2:])
    assert body["response_format"] == response_format()
    assert body["response_format"]["json_schema"]["schema"]["additionalProperties"] is False
    assert body["model"] == served.server.served_model and body["temperature"] == 0.0
    # transformers serve ignores response_format and the random model writes garbage: the measured
    # regions come back as findings, flagged, and who answered is recorded.
    assert FLAG_UNUSABLE in reading.flags and {f.source for f in reading.findings} == {"measurement"}
    assert reading.served_model == served.server.served_model
    assert reading.server_version == "server=uvicorn"  # transformers serve reports no version; its Server header says what it is
    assert reading.latency_s is not None and reading.latency_s > 0


def test_a_well_formed_answer_is_parsed_and_a_truncated_one_repaired(served, pair, regions):
    prior, current = pair
    vlm = served_vlm(served)
    served.proxy.reset(answer=GOOD)
    good = vlm.compare(current, prior, regions)
    assert good.usable and good.findings[0].change == "worsened" and good.findings[0].source == "vlm"
    assert good.priority == "urgent"
    served.proxy.reset(answer=GOOD[:-40])
    cut = vlm.compare(current, prior, regions)
    assert FLAG_REPAIRED in cut.flags and cut.usable and cut.findings[0].finding == "consolidation"


def test_a_servers_own_version_is_recorded(served, pair):
    served.proxy.reset(version="0.11.0")  # a server with a /version endpoint, as vLLM has
    assert served_vlm(served).compare(*reversed(pair)).server_version == "0.11.0"


def test_a_server_that_is_down_is_transient(served, pair):
    from dicom_node.local_stack.procs import free_port

    prior, current = pair
    with pytest.raises(ModelServerUnavailable, match="cannot reach") as err:
        served_vlm(served, base_url=f"http://127.0.0.1:{free_port()}/v1").compare(current, prior)
    assert classify(err.value) == TRANSIENT


def test_a_slow_server_times_out_as_transient(served, pair):
    prior, current = pair
    served.proxy.reset(delay_s=4.0)
    t0 = time.monotonic()
    with pytest.raises(ModelServerUnavailable, match="vlm_timeout_seconds=1") as err:
        served_vlm(served, timeout=1.0).compare(current, prior)
    assert time.monotonic() - t0 < 3.0
    assert classify(err.value) == TRANSIENT


@pytest.mark.parametrize("status", [429, 503])
def test_busy_answers_are_transient(served, pair, status):
    prior, current = pair
    served.proxy.reset(status=status, message="queue full")
    with pytest.raises(ModelServerUnavailable, match=f"{status}: queue full") as err:
        served_vlm(served).compare(current, prior)
    assert classify(err.value) == TRANSIENT


def test_a_refused_request_is_permanent_with_the_servers_message(served, pair):
    prior, current = pair
    # The real server is pinned to its model: asking for another one is its 400.
    with pytest.raises(ModelServerRejected, match=r"\(400\): Server is pinned to") as err:
        served_vlm(served, served_model="another-model").compare(current, prior)
    assert classify(err.value) == PERMANENT


def test_readiness_probe_checks_the_served_model(served):
    assert served_vlm(served).backend.probe() == [served.server.served_model]
    with pytest.raises(ModelServerRejected, match="set vlm_served_model"):
        served_vlm(served, served_model="another-model").backend.probe()


@pytest.mark.parametrize("limit", [4, 2])
def test_comparisons_in_flight_are_concurrent_requests_up_to_the_limit(served, tmp_path, pair, regions, limit):
    """Four comparisons at once, as a gpu worker's four threads run them: four requests in flight
    (the server can batch them), never more than vlm_max_concurrency."""
    prior, current = pair
    result = SimpleNamespace(regions=regions, refused=False, priors_compared=[prior.source])  # what vlm_compare reads
    settings = settings_for(served, tmp_path, vlm_max_concurrency=limit)
    served.proxy.reset(delay_s=1.0)  # each request is held long enough for the others to arrive
    with ThreadPoolExecutor(4) as pool:
        readings = list(pool.map(lambda _: vlm_compare(settings, current, [prior], result, None), range(4)))
    assert len(served.proxy.requests) == 4 and served.proxy.max_in_flight == limit
    assert all(r.served_model == served.server.served_model for r in readings)
    _served.cache_clear()


def test_the_api_key_comes_from_its_file_and_is_never_shown(served, tmp_path, pair):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    settings = settings_for(served, tmp_path, vlm_api_key_file=key_file)
    load_configured_model(settings, warm_up=False).compare(*reversed(pair))
    assert served.proxy.authorizations == ["Bearer s3cret-key"]
    env_settings = settings_for(served, tmp_path, vlm_api_key="other-secret")
    assert "other-secret" not in repr(env_settings) and "other-secret" not in env_settings.model_dump_json()
    assert "s3cret" not in repr(_ModelChoice.of(settings))


def test_the_served_path_imports_neither_torch_nor_transformers(served, tmp_path):
    """What a thin gpu worker runs for one comparison: the analysis engine, then the model server."""
    code = f"""
import sys

class NotInstalled:  # as on the node's CPU image: torch and transformers cannot be imported at all
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(name + " is not installed here")

sys.meta_path.insert(0, NotInstalled())
import inference
from dicom_node.config import Settings
from dicom_node.pipeline import stages, tasks  # what the worker imports
from dicom_node.pipeline.vlm import vlm_compare
from inference.phantoms import make_chest_pair
from inference.pixels import image_from_dataset
pair = make_chest_pair(5, "new_nodule", size=256)
current, prior = image_from_dataset(pair.current), image_from_dataset(pair.prior)
result = inference.compare(current, [prior])
settings = Settings(vlm_backend="openai", vlm_base_url={served.proxy.base_url!r}, vlm_served_model={served.server.served_model!r})
reading = vlm_compare(settings, current, [prior], result, None)
print(reading.served_model, sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "[]", out.stdout
    assert len(served.proxy.requests) == 1


def _compare_cli(tmp_path, env_extra: dict[str, str]):
    """`dicom-node compare CURRENT PRIOR --vlm --json`, in process (the command's own code, settings from the environment)."""
    from typer.testing import CliRunner

    from dicom_node.cli import app
    from inference.phantoms import make_chest_pair

    pair = make_chest_pair(3, "new_nodule", size=256)
    pair.current.save_as(tmp_path / "cur.dcm", enforce_file_format=True)
    pair.prior.save_as(tmp_path / "pri.dcm", enforce_file_format=True)
    out = CliRunner().invoke(app, ["compare", str(tmp_path / "cur.dcm"), str(tmp_path / "pri.dcm"), "--vlm", "--json"],
                             env=env_extra)
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def test_offline_compare_with_the_model(served, tmp_path):
    from dicom_node.local_stack.procs import free_port

    doc = _compare_cli(tmp_path, served.settings_env())
    assert doc["regions"] and doc["vlm"]["status"] == "unusable"  # the random model's garbage
    assert doc["vlm"]["model"] == served.server.served_model and doc["vlm"]["latency_s"] > 0
    assert {f["source"] for f in doc["vlm"]["findings"]} == {"measurement"}

    served.proxy.reset(answer=GOOD)
    doc = _compare_cli(tmp_path, served.settings_env())
    assert doc["vlm"]["status"] == "ok" and doc["vlm"]["findings"][0]["finding"] == "consolidation"

    down = served.settings_env(DICOM_NODE_VLM_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    doc = _compare_cli(tmp_path, down)
    assert doc["vlm"]["status"] == "unavailable" and "cannot reach" in doc["vlm"]["error"]
    assert doc["regions"]  # the measured regions are kept whatever the model does

