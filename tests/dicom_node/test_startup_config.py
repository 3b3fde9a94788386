"""Settings checked at start: the UID root for derived UIDs, and unknown DICOM_NODE_* variables."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from pydantic import ValidationError

from dicom_node import identity
from dicom_node.config import Settings, unknown_env_variables
from dicom_node.startup import prepare, warn_about_configuration

SITE_ROOT = "1.2.840.999999.7"


@pytest.fixture
def restore_root():
    saved = identity.UID_ROOT
    yield
    identity.set_uid_root(saved)


def test_a_valid_uid_root_gets_its_final_dot():
    assert Settings(uid_root=SITE_ROOT).uid_root == SITE_ROOT + "."
    assert Settings(uid_root="2.16.840.1.113883.3.9999.").uid_root == "2.16.840.1.113883.3.9999."
    assert Settings().uid_root == identity.DEFAULT_UID_ROOT


@pytest.mark.parametrize("root, message", [
    ("1.2.0840.5", "leading zero"),
    ("1.2.abc", "digits and dots"),
    ("1", "at least two components"),
    ("3.1.2", "starting with 0, 1 or 2"),
    ("1..2", "digits and dots"),
    ("2.25.12345", "UUID-derived"),
    ("1.2.840." + "1" * 40, "at most 40"),
])
def test_an_invalid_uid_root_is_refused(root, message):
    with pytest.raises(ValidationError, match=message):
        Settings(uid_root=root)


def test_the_node_refuses_to_start_with_an_invalid_uid_root(tmp_path):
    import os

    env = dict(os.environ, DICOM_NODE_UID_ROOT="1.2.03", DICOM_NODE_STORAGE_DIR=str(tmp_path / "store"),
               DICOM_NODE_DATABASE_URL=f"sqlite:///{tmp_path / 'index.db'}")
    result = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--no-dispatch"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "uid_root" in result.stderr and "leading zero" in result.stderr


def test_derived_uids_are_under_the_site_root_and_stable(tmp_path, restore_root):
    from dicom_node.report.reading import _tracking_uid as tracking_uid
    from dicom_node.report.sr import _uid

    prepare(Settings(uid_root=SITE_ROOT, storage_dir=tmp_path))
    first = _uid("sr", "1.2.3", "job-1")
    assert first.startswith(SITE_ROOT + ".") and len(first) <= 64 and first.is_valid
    assert _uid("sr", "1.2.3", "job-1") == first  # same inputs, same root: same UID
    assert _uid("sr", "1.2.3", "job-2") != first
    tracking = tracking_uid("1.2.3", "right lower zone", "nodule", 1)
    assert tracking.startswith(SITE_ROOT + ".")
    longest = "1.2.840." + "9" * 31 + "."  # 40 characters: the longest root allowed
    prepare(Settings(uid_root=longest, storage_dir=tmp_path))
    uid = _uid("sr", "1.2.3", "job-1")
    assert uid.startswith(longest) and len(uid) == 64 and len(uid) - len(longest) == 24
    identity.set_uid_root(identity.DEFAULT_UID_ROOT)
    assert _uid("sr", "1.2.3", "job-1") != first  # another root: other UIDs


def test_unknown_variables_are_named_with_the_closest_setting():
    environ = {
        "DICOM_NODE_STUDY_IDLE_SECOND": "5",  # a typo of study_idle_seconds
        "DICOM_NODE_PRIORS__ARCHIVE": "[]",  # a typo inside a section
        "DICOM_NODE_PRIORS__ARCHIVES": "[]",
        "DICOM_NODE_STUDY_RULES__CT__IDLE_SECONDS": "60",  # a dict setting takes any key
        "DICOM_NODE_CONFIG_FILE": "/etc/node.yaml",
        "DICOM_NODE_QQQZZZ": "1",
        "OTHER_VARIABLE": "1",
    }
    assert unknown_env_variables(environ) == [
        ("DICOM_NODE_PRIORS__ARCHIVE", "DICOM_NODE_PRIORS__ARCHIVES"),
        ("DICOM_NODE_QQQZZZ", None),
        ("DICOM_NODE_STUDY_IDLE_SECOND", "DICOM_NODE_STUDY_IDLE_SECONDS"),
    ]


def test_unknown_variables_are_logged_as_warnings_at_start(tmp_path, caplog, restore_root):
    settings = Settings(storage_dir=tmp_path)
    prepare(settings)
    caplog.set_level(logging.INFO, logger="dicom_node.startup")
    warn_about_configuration(settings, {"DICOM_NODE_STUDY_IDLE_SECOND": "5"})
    unknown = [r for r in caplog.records if r.getMessage() == "config.unknown_variable"]
    assert len(unknown) == 1 and unknown[0].levelno == logging.WARNING
    assert unknown[0].event_fields == {"variable": "DICOM_NODE_STUDY_IDLE_SECOND",
                                       "hint": "did you mean DICOM_NODE_STUDY_IDLE_SECONDS?",
                                       "closest": "DICOM_NODE_STUDY_IDLE_SECONDS"}
    assert any(r.getMessage() == "config.default_uid_root" for r in caplog.records)


def test_the_worker_logs_the_warning_when_it_starts(tmp_path):
    """Through the real entry point: `dicom-node worker` logs the warning before it connects."""
    import os

    from tests.support.procs import free_port

    env = dict(os.environ, DICOM_NODE_STUDY_IDLE_SECOND="5", DICOM_NODE_STORAGE_DIR=str(tmp_path / "store"),
               DICOM_NODE_DATABASE_URL=f"sqlite:///{tmp_path / 'index.db'}", DICOM_NODE_WORK_DIR=str(tmp_path / "jobs"),
               DICOM_NODE_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0", DICOM_NODE_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "worker", "-Q", "io"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "config.unknown_variable" in line:
                assert "DICOM_NODE_STUDY_IDLE_SECONDS" in line
                break
        else:
            pytest.fail("the worker exited without the warning")
    finally:
        proc.kill()
        proc.wait()


def test_an_empty_file_setting_means_not_configured(monkeypatch):
    monkeypatch.setenv("DICOM_NODE_HTTP_TOKEN_FILE", "")
    monkeypatch.setenv("DICOM_NODE_PSEUDONYM_KEY_FILE", " ")
    settings = Settings()
    assert settings.http_token_file is None and settings.pseudonym_key_file is None
