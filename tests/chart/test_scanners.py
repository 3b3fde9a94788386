"""checkov on the rendered manifests of every value set and on the Dockerfiles (one run), and
hadolint on the Dockerfiles. Each check left failing is skipped where it applies, with its reason
(chart: checkov.io/skip annotations; Dockerfiles: checkov:skip / hadolint ignore comments): any
new failure fails here. The tools are installed by scripts/setup.sh; missing, the tests fail."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .helm import render
from .value_sets import value_sets

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.gpu"]
# checkov pins dependencies that clash with the project's, so it has a virtual environment of its own.
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory) -> dict:
    assert CHECKOV.exists(), f"{CHECKOV} missing: run scripts/setup.sh"
    scan = tmp_path_factory.mktemp("checkov")
    for name, values in value_sets().items():
        (scan / f"{name}.yaml").write_text(yaml.safe_dump_all(render(values)))
    for dockerfile in DOCKERFILES:
        shutil.copy(dockerfile, scan / dockerfile.name)
    result = subprocess.run(
        [str(CHECKOV), "-d", str(scan), "--framework", "kubernetes", "dockerfile", "--compact",
         "-o", "json", "--skip-download"],  # --skip-download: no network (guidelines from the vendor's API)
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    return {r["check_type"]: r for r in (reports if isinstance(reports, list) else [reports])}


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_finds_nothing_new(checkov_report, framework):
    report = checkov_report[framework]
    failed = [f"{f['check_id']} {f['check_name']}: {f['resource']} ({f['file_path']})" for f in report["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert report["summary"]["passed"] > (300 if framework == "kubernetes" else 100)  # it did check
    assert report["summary"]["parsing_errors"] == 0
    assert report["results"]["skipped_checks"], "the known skips are gone: drop their annotations"
    for skipped in report["results"]["skipped_checks"]:
        reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) > 15, f"{skipped['check_id']} on {skipped['resource']} skipped without a reason"


def test_hadolint_passes_the_dockerfiles():
    assert HADOLINT.exists(), f"{HADOLINT} missing: run scripts/setup.sh"
    result = subprocess.run([str(HADOLINT), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The check above can fail: an unpinned apt install in a shell-form RUN is reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout
