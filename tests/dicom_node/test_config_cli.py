"""Settings sources and the command line, run as a user would (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from dicom_node.config import CONFIG_FILE_ENV, Settings
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
