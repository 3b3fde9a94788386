"""The sanity gate catches each corruption, with a reason, and leaves valid pairs alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from inference.sanity import check_pair
from tests.inference.conftest import chest_images


@pytest.fixture(scope="module")
def valid():
    return [chest_images(s, c, size=256)[:2] for s, c in ((21, "stable"), (22, "new_effusion"), (23, "growing_nodule"))]


def codes(flags, blocking=True):
    return {f.code for f in flags if f.blocking == blocking}


def test_valid_repositioned_pairs_raise_no_flag(valid):
    for cur, pri in valid:
        assert check_pair(cur, pri) == []


R = dataclasses.replace
CASES = {
    "laterality_mismatch": lambda c, p: (R(c, laterality="R"), R(p, laterality="L")),
    "body_part_mismatch": lambda c, p: (c, R(p, body_part="ABDOMEN")),
    "modality_mismatch": lambda c, p: (c, R(p, modality="MR")),
    "view_mismatch": lambda c, p: (c, R(p, view="LL")),
    "blank_image": lambda c, p: (c, R(p, pixels=np.zeros_like(p.pixels))),
    "saturated_image": lambda c, p: (R(c, pixels=np.where(c.pixels > np.percentile(c.pixels, 30), 4095.0,
                                                          c.pixels).astype(np.float32)), p),
    "duplicate": lambda c, p: (c, R(c, source="resent.dcm")),
    "implausible_spacing": lambda c, p: (c, R(p, spacing_mm=(0.001, 0.001))),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_header_and_exposure_corruptions_are_blocking(valid, code):
    for cur, pri in valid:
        flags = check_pair(*CASES[code](cur, pri))
        assert code in codes(flags), flags
        assert all(f.reason for f in flags)


@pytest.mark.parametrize("transform", [
    lambda a: a[:, ::-1], lambda a: a[::-1, :], lambda a: np.rot90(a), lambda a: a[::-1, ::-1]],
    ids=["flip-lr", "flip-tb", "rot90", "rot180"])
def test_flipped_or_rotated_prior_detected_from_pixels(valid, transform):
    for cur, pri in valid:
        bad = dataclasses.replace(pri, pixels=np.ascontiguousarray(transform(pri.pixels)))
        flags = check_pair(cur, bad)  # headers untouched: only the pixels tell
        assert "flipped_or_rotated" in codes(flags), flags


def test_ap_versus_pa_is_flagged_but_compared(valid):
    cur, pri = valid[0]
    flags = check_pair(cur, dataclasses.replace(pri, view="AP"))
    assert codes(flags, blocking=False) == {"view_mismatch"} and not codes(flags)


def test_same_sop_instance_uid_is_a_duplicate(valid):
    cur, pri = valid[0]
    flags = check_pair(cur, dataclasses.replace(pri, sop_instance_uid=cur.sop_instance_uid))
    assert "duplicate" in codes(flags)


def test_unknown_laterality_and_body_part_are_not_mismatches(valid):
    cur, pri = valid[0]
    flags = check_pair(dataclasses.replace(cur, laterality="", body_part=""),
                       dataclasses.replace(pri, laterality="U", body_part="THORAX"))
    assert not codes(flags)


def test_ultrasound_black_background_is_not_saturation(valid):
    cur, pri = valid[0]
    sector = np.zeros_like(cur.pixels)
    sector[: cur.pixels.shape[0] // 3] = cur.pixels[: cur.pixels.shape[0] // 3]  # two thirds black, as a US sector
    us = lambda img: dataclasses.replace(img, modality="US", body_part="", view="", pixels=sector)  # noqa: E731
    assert "saturated_image" not in codes(check_pair(us(cur), dataclasses.replace(us(pri), pixels=sector[::-1].copy())))
    dx = dataclasses.replace(cur, pixels=sector)  # the same on a radiograph: the detector saw nothing
    assert "saturated_image" in codes(check_pair(dx, pri))


def test_lossy_compressed_prior_is_flagged_and_its_artefacts_are_not_change(tmp_path):
    """A 339:1 JPEG 2000 copy of a CT slice against the original: flagged, and no region of change."""
    import copy

    from pydicom.uid import generate_uid

    from inference import compare
    from inference.phantoms import _lossy, make_ct_pair
    from inference.pixels import image_from_dataset

    original = make_ct_pair(4, "stable", shape=(8, 512, 512), spacing_mm=(3.0, 0.7, 0.7)).current[4]
    copy_ = copy.deepcopy(original)
    copy_.SOPInstanceUID = generate_uid(entropy_srcs=["lossy copy"])
    _lossy(copy_, 339)
    res = compare(image_from_dataset(original, "original"), [image_from_dataset(copy_, "j2k")], with_overlay=False)
    flags = {f.code: f for f in res.sanity_flags}
    assert "lossy_compressed" in flags and not flags["lossy_compressed"].blocking and "339:1" in flags["lossy_compressed"].reason
    assert not res.refused and res.regions == []
