"""Settings sources and the command line, run as a user would (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from dicom_node.config import CONFIG_FILE_ENV, Settings
from inference.types import CHANGE_STATUSES
from tests.support.procs import REPO

from .conftest import NODE_AE


def test_defaults_match_design():
    s = Settings()
    assert (s.ae_title, s.port, s.tls_port, s.study_idle_seconds, s.duplicate_policy) == ("DICOM_NODE", 11112, 2762, 30.0, "keep_first")


def test_environment_and_yaml_file(tmp_path, monkeypatch):
    config = tmp_path / "node.yaml"
    config.write_text("ae_title: FROM_YAML\nport: 4242\nstudy_rules:\n  CT:\n    required_series: 2\n")
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    monkeypatch.setenv("DICOM_NODE_PORT", "5353")  # environment beats the file
    monkeypatch.setenv("DICOM_NODE_ALLOWED_CALLERS", "PACS@10.0.0.5, MODALITY1")
    s = Settings()
    assert s.ae_title == "FROM_YAML"
    assert s.port == 5353
    assert s.allowed_callers == ["PACS@10.0.0.5", "MODALITY1"]
    assert s.rule_for("ct").required_series == 2


def test_missing_config_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Settings()


@pytest.mark.parametrize("title", ["", "A" * 17, "BAD\\AE"])
def test_invalid_ae_title_rejected(title):
    with pytest.raises(ValidationError, match="AE title"):
        Settings(ae_title=title)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli_echo_send_status(node, ct_study, monkeypatch):
    port = str(node.settings.port)
    echo = cli("echo", "127.0.0.1", port, "-c", NODE_AE)
    assert echo.returncode == 0 and "status 0x0000" in echo.stdout
    _, paths = ct_study
    sent = cli("send", "127.0.0.1", port, str(paths[0].parent), "-c", NODE_AE)
    assert sent.returncode == 0, sent.stderr
    assert f"sent {len(paths)}" in sent.stdout
    import os

    env = dict(os.environ, DICOM_NODE_DATABASE_URL=node.settings.database_url)
    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["instances"] == len(paths)


def test_cli_echo_unreachable_peer_says_so():
    from tests.support.procs import free_port

    result = cli("echo", "127.0.0.1", str(free_port()), "-c", NODE_AE)
    assert result.returncode == 2
    assert "could not connect" in result.stderr


def test_cli_send_rejected_calling_ae_says_register(make_node, ct_study):
    node = make_node(allowed_callers=["SOMEONE_ELSE"])
    _, paths = ct_study
    result = cli("send", "127.0.0.1", str(node.settings.port), str(paths[0]), "-c", NODE_AE, "-a", "STRANGER")
    assert result.returncode == 2
    assert "register this node's AE title" in result.stderr


def test_http_status_and_metrics(node, ct_study):
    import urllib.request

    from .conftest import run_tool

    _, paths = ct_study
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    base = f"http://127.0.0.1:{node.settings.http_port}"
    with urllib.request.urlopen(base + "/status") as response:
        status = json.loads(response.read())
    assert status["counts"]["instances"] == len(paths)
    with urllib.request.urlopen(base + "/metrics") as response:
        metrics = response.read().decode()
    assert 'dicom_node_instances_total{outcome="accepted"}' in metrics
    assert 'dicom_node_index{kind="instances"} 5.0' in metrics


def test_cli_compare_offline_finds_new_nodule(tmp_path):
    from inference.phantoms import make_chest_pair

    pair = make_chest_pair(seed=3, change="new_nodule", size=256)
    current, prior = tmp_path / "current.dcm", tmp_path / "prior.dcm"
    pair.current.save_as(current, enforce_file_format=True)
    pair.prior.save_as(prior, enforce_file_format=True)
    overlay = tmp_path / "overlay.png"
    result = cli("compare", str(current), str(prior), "--json", "--overlay", str(overlay))
    assert result.returncode == 0, result.stderr
    regions = json.loads(result.stdout)["regions"]
    # Detection and place are this command's business; status accuracy is benchmarked in inference.
    assert len(regions) == 1
    assert regions[0]["zone"] == pair.truth.regions[0].zone
    assert regions[0]["status"] in CHANGE_STATUSES
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_compare_bad_file_names_it(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not dicom at all")
    result = cli("compare", str(bad), str(bad))
    assert result.returncode == 2
    assert "broken.dcm" in result.stderr


def test_cli_models_lists_repository():
    result = cli("models", "--json")
    assert result.returncode == 0, result.stderr
    names = {m["name"] for m in json.loads(result.stdout)}
    assert {"medgemma-4b-it", "qwen2.5-vl-3b-instruct"} <= names


def _fields(model) -> set[str]:
    return set(model.model_fields)


def test_readme_documents_every_setting():
    from dicom_node.priors.settings import ArchiveConfig, PriorSettings
    from dicom_node.references.settings import ReferenceSettings
    from dicom_node.report.settings import Destination, ReportSettings

    readme = (REPO / "README.md").read_text()
    documented = set(__import__("re").findall(r"`([a-z0-9_]+)`", readme))
    sections = {"Settings": _fields(Settings) - {"priors", "report"}, "PriorSettings": _fields(PriorSettings),
                "ArchiveConfig": _fields(ArchiveConfig), "ReportSettings": _fields(ReportSettings),
                "Destination": _fields(Destination), "ReferenceSettings": _fields(ReferenceSettings)}
    missing = {name: sorted(fields - documented) for name, fields in sections.items() if fields - documented}
    assert not missing, f"settings missing from the README's configuration reference: {missing}"


def test_scp_and_io_processes_do_not_load_the_model_stack():
    """The SCP and io workers never run a model: importing them must not pull in torch (~200 MB RSS)."""
    code = ("import sys, dicom_node.scp, dicom_node.pipeline.tasks, dicom_node.report.delivery; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_compare_stage_does_not_load_the_report_stack():
    """The gpu worker runs only the compare stage: it needs neither highdicom nor the delivery outbox."""
    code = ("import sys, dicom_node.pipeline.tasks, dicom_node.pipeline.artifacts, inference.overlay, dicom_node.scp; "
            "from dicom_node.pipeline import retry; retry.classify(ValueError()); "
            "print(sorted(m for m in ('highdicom', 'dicom_node.report.delivery', 'dicom_node.report.sr') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
