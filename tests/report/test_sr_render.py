"""What a reader sees: the SR rendered by DCMTK's dsr2html and shown in a real browser (Debian chromium,
headless), with a screenshot kept as a test artefact (var/test-artifacts/)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dicom_node.report import ReportSettings, build_sr

ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: apt-get install dcmtk chromium")
    return path


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           *args], capture_output=True, text=True, timeout=120)


def test_growing_nodule_report_reads_as_labelled_sizes_at_both_time_points(cases, tmp_path):
    case = cases["growing_nodule"]
    sr = build_sr(case.inp, ReportSettings())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    page = tmp_path / "sr.html"
    out = subprocess.run([_tool("dsr2html"), str(tmp_path / "sr.dcm"), str(page)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr

    dom = _chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom.stdout)).split())
    region = [r for r in case.inp.comparison.regions if len(r.timepoints) == 2 and all(t.present for t in r.timepoints)][0]
    before, now = region.timepoints
    # Every value has its label next to it (SEPARATE containers), in mm, at both time points
    for tp in (before, now):
        assert re.search(rf"Long axis:? {tp.long_axis_mm:g} mm", text), text[:3000]
        assert re.search(rf"Area:? {tp.area_mm2:g} mm2", text)
        assert f"Time Point = \"{tp.date.isoformat()}\"" in text
    assert "Baseline" in text and "Image Library" in text and "Impression" in text
    assert "Signal change" not in text and "{1}" not in text  # no value in a unit nobody can read
    # The summary reads as sentences, starting with the comparison, not bare fragments
    assert re.search(r"Compared with prior study of \d{4}-\d{2}-\d{2}", text)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "sr_growing_nodule.png"
    shot.unlink(missing_ok=True)
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,6000", page.as_uri())
    assert result.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    print(f"screenshot: {shot}")
