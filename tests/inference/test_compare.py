"""compare(): measured regions on generated pairs with known truth, refusals, JSON and overlay."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest

import inference
from inference import compare, result_to_dict, save_overlay_png
from inference.phantoms import make_ct_pair
from inference.pixels import volume_from_datasets
from inference.registration import register
from tests.inference.conftest import chest_images


def _centre_inside(region, bbox, margin=3):
    r = (region.bbox[0] + region.bbox[2]) / 2
    c = (region.bbox[1] + region.bbox[3]) / 2
    return bbox[0] - margin <= r <= bbox[2] + margin and bbox[1] - margin <= c <= bbox[3] + margin


def test_new_nodule_found_in_the_right_zone_with_its_diameter(new_nodule_case):
    cur, pri, truth = new_nodule_case
    res = compare(cur, [pri])
    t = truth.regions[0]
    assert res.registration.succeeded and res.registration.ncc_after > res.registration.ncc_before
    hits = [r for r in res.regions if _centre_inside(r, t.bbox)]
    assert len(hits) == 1, res.regions
    r = hits[0]
    assert r.status == "new" and r.kind == "increase" and r.mean_change > 0
    assert r.zone == t.zone
    assert r.longest_diameter_mm == pytest.approx(16.0, rel=0.25)
    assert r.area_mm2 == pytest.approx(np.pi * 8.0**2, rel=0.4)
    assert 0.5 < r.confidence <= 1.0
    assert len(r.contour) > 8 and all(r.bbox[0] <= y < r.bbox[2] and r.bbox[1] <= x < r.bbox[3]
                                      for y, x in r.contour)
    assert len(res.regions) <= 2  # at most one stray region besides the nodule
    assert "new" in res.summary and res.findings and res.prior_source == pri.source


def test_stable_repositioned_pair_gives_no_regions(stable_case):
    cur, pri, truth = stable_case
    shift = truth.prior_to_current
    assert abs(shift["angle_deg"]) > 0.1 or max(abs(s) for s in shift["shift_px"]) > 1  # really moved
    res = compare(cur, [pri])
    assert res.registration.succeeded
    assert res.regions == [] and not res.refused
    assert "No measurable change" in res.summary


@pytest.mark.parametrize("seed,change,status,size_mm", [
    (31, "growing_nodule", "worsened", 24.0),
    (34, "shrinking_nodule", "improved", 24.0),
    (35, "resolved_nodule", "resolved", 16.0),
    (32, "resolved_effusion", "resolved", None),
    (33, "new_consolidation", "new", None),
])
def test_change_status_matches_truth(seed, change, status, size_mm):
    cur, pri, truth = chest_images(seed, change, lesion_size_mm=size_mm)
    res = compare(cur, [pri], with_overlay=False)
    t = truth.regions[0]
    hits = [r for r in res.regions if _centre_inside(r, t.bbox)]
    assert hits and hits[0].status == status, res.regions
    assert hits[0].zone == t.zone


def test_large_image_is_analysed_on_a_coarser_grid_and_reported_in_its_own_pixels():
    cur, pri, truth = chest_images(41, "new_nodule", size=1024, lesion_size_mm=20.0)
    res = compare(cur, [pri])
    assert res.analysis_spacing_mm == pytest.approx((430 / 512, 430 / 512), abs=1e-3)
    t = truth.regions[0]
    hits = [r for r in res.regions if _centre_inside(r, t.bbox, margin=6)]
    assert hits and hits[0].longest_diameter_mm == pytest.approx(20.0, rel=0.25)
    assert hits[0].bbox[2] <= 1024 and hits[0].bbox[2] - hits[0].bbox[0] > 30  # full-resolution pixels


def test_refused_pair_has_reason_and_no_regions(new_nodule_case):
    cur, pri, _ = new_nodule_case
    res = compare(cur, [dataclasses.replace(pri, pixels=np.ascontiguousarray(pri.pixels[:, ::-1]))])
    assert res.refused and res.regions == [] and res.registration is None
    assert "flipped" in res.summary and any(f.code == "flipped_or_rotated" and f.blocking for f in res.sanity_flags)


def test_no_prior():
    cur, _, _ = chest_images(1, "stable", size=128)
    res = compare(cur, [])
    assert res.no_prior and not res.regions and not res.refused


def test_most_recent_usable_prior_is_used(new_nodule_case):
    cur, pri, _ = new_nodule_case
    older = dataclasses.replace(pri, acquired_on=date(2020, 1, 1), source="older.dcm")
    newer_bad = dataclasses.replace(pri, acquired_on=date(2024, 1, 1), body_part="KNEE", source="newer.dcm")
    res = compare(cur, [older, newer_bad], with_overlay=False)
    assert res.prior_source == "older.dcm" and not res.refused
    assert any(f.code == "prior_skipped" and "newer.dcm" in f.reason for f in res.sanity_flags)


def test_failed_registration_claims_no_change():
    cur, pri, _ = chest_images(5, "new_nodule")
    rng = np.random.default_rng(0)
    from scipy import ndimage

    texture = ndimage.gaussian_filter(rng.standard_normal(cur.pixels.shape), 12).astype(np.float32)
    unrelated = (texture - texture.min()) / np.ptp(texture) * 3000
    reg = register(cur.pixels, cur.spacing_mm, unrelated, cur.spacing_mm)
    assert not reg.quality.succeeded and reg.quality.ncc_after < 0.6


def test_registration_failure_refuses_inside_compare(monkeypatch, new_nodule_case):
    from inference import pipeline
    from inference.registration import Registered
    from inference.types import RegistrationQuality

    cur, pri, _ = new_nodule_case

    def failing(fixed, *a, **k):
        return Registered(fixed, np.ones(fixed.shape, bool), RegistrationQuality(0.3, 0.2, False, "test"))

    monkeypatch.setattr(pipeline, "register", failing)
    res = compare(cur, [pri])
    assert res.refused and res.regions == [] and res.overlay is None
    assert any(f.code == "registration_failed" for f in res.sanity_flags)


def test_json_and_overlay(tmp_path, new_nodule_case):
    cur, pri, truth = new_nodule_case
    res = compare(cur, [pri])
    d = result_to_dict(res)
    text = json.dumps(d)
    back = json.loads(text)
    assert back["schema_version"] == 2 and back["regions"][0]["status"] == res.regions[0].status
    assert set(back) >= {"current", "prior", "refused", "no_prior", "summary", "findings", "sanity_flags",
                         "registration", "regions", "analysis_spacing_mm"}
    assert set(back["regions"][0]) >= {"status", "confidence", "zone", "bbox", "area_mm2", "longest_diameter_mm",
                                       "mean_change", "contour", "kind", "timepoints", "trend"}
    [prior_tp, current_tp] = back["regions"][0]["timepoints"]
    assert prior_tp["present"] is False and prior_tp["long_axis_mm"] is None and prior_tp["area_mm2"] is None
    assert current_tp["present"] is True and current_tp["date"] == cur.acquired_on.isoformat()
    assert back["regions"][0]["trend"] == "new"
    from inference.serialize import result_from_dict

    assert result_from_dict(back).regions[0].timepoints == res.regions[0].timepoints
    out = tmp_path / "o.png"
    save_overlay_png(res, out)
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.shape == (cur.pixels.shape[0], cur.pixels.shape[1], 3)
    r0, c0, r1, c1 = truth.regions[0].bbox
    patch = img[r0:r1, c0:c1].astype(int)
    assert (patch[..., 0] - patch[..., 2]).max() > 60  # red (increase) where the nodule appeared
    refused = compare(cur, [])
    with pytest.raises(ValueError):
        save_overlay_png(refused, tmp_path / "none.png")


def test_ct_volume_new_nodule_measured_in_3d():
    pair = make_ct_pair(3, "new_nodule", lesion_size_mm=14.0)
    cur, pri = volume_from_datasets(pair.current), volume_from_datasets(pair.prior)
    res = compare(cur, [pri])
    assert res.registration.succeeded and "rigid" in res.registration.transform
    t = pair.truth.regions[0]
    hits = [r for r in res.regions if r.bbox_3d is not None and _iou3(r.bbox_3d, t.bbox) > 0.2]
    assert len(hits) == 1, res.regions
    r = hits[0]
    assert r.status == "new" and r.zone.startswith(t.zone)
    assert r.volume_mm3 == pytest.approx(4 / 3 * np.pi * 7.0**3, rel=0.5)
    assert r.longest_diameter_mm == pytest.approx(14.0, rel=0.35)
    assert res.overlay is not None and res.overlay.shape[:2] == cur.pixels.shape[1:]


def test_ct_stable_pair_gives_no_regions():
    pair = make_ct_pair(4, "stable")
    res = compare(volume_from_datasets(pair.current), [volume_from_datasets(pair.prior)])
    assert res.registration.succeeded and res.regions == []


def _iou3(a, b):
    inter = 1.0
    for k in range(3):
        lo, hi = max(a[k], b[k]), min(a[k + 3], b[k + 3])
        if hi <= lo:
            return 0.0
        inter *= hi - lo
    va = np.prod([a[k + 3] - a[k] for k in range(3)])
    vb = np.prod([b[k + 3] - b[k] for k in range(3)])
    return inter / (va + vb - inter)


def test_import_is_light_and_independent_of_dicom_node():
    code = ("import sys, inference; "
            "bad = [m for m in ('SimpleITK', 'scipy', 'dicom_node') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(inference.__file__).parents[1])
    assert out.returncode == 0, out.stdout + out.stderr
    root = Path(inference.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import dicom_node" not in text and "from dicom_node" not in text, f
