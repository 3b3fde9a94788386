import dataclasses

import numpy as np

from inference.vlm.imaging import crop_pair, rank_regions, to_display
from inference.vlm.prompting import ImageSlot, build_prompt, load_prompt_set

PS = load_prompt_set("chest_compare_v1")


def test_roles_order_dates_interval(pair, regions):
    prior, current = pair
    p = build_prompt(PS, current, prior, regions, "Small left effusion.", "Shortness of breath", max_regions=2)
    t = p.text
    assert t.index("Image 1: PRIOR, 2024-01-10, PA") < t.index("<image:prior>") < t.index(
        "Image 2: CURRENT, 2024-03-20, PA") < t.index("<image:current>")
    assert "Interval between the studies: 70 days." in t
    assert "Prior report:\nSmall left effusion." in t and "Clinical indication: Shortness of breath" in t
    assert [s.role for s in p.images] == ["prior", "current", "prior_crop", "current_crop", "prior_crop", "current_crop"]
    assert not p.single_image and p.prompt_set == "chest_compare_v1@1.0.0"


def test_regions_grounding_largest_first_and_capped(pair, regions):
    prior, current = pair
    t = build_prompt(PS, current, prior, regions, max_regions=2).text
    assert "Region 1: right lower zone; area 420 mm2, longest diameter 31.5 mm; mean intensity change +0.42; measured as worsened." in t
    assert "Region 2: left hilum; area 60 mm2" in t and "left upper zone; area" not in t
    assert t.index("Region 1 (right lower zone) zoomed") < t.index("Region 2 (left hilum) zoomed")


def test_anatomical_questions_for_chest(pair):
    prior, current = pair
    t = build_prompt(PS, current, prior, []).text
    for zone in ("right costophrenic angle", "cardiac silhouette", "left hilum", "mediastinum", "lines and tubes"):
        assert f"- {zone}" in t
    assert "measured no significant change" in t
    other = dataclasses.replace(current, body_part="KNEE")
    t2 = build_prompt(PS, other, prior, []).text
    assert "- whole image" in t2 and "- cardiac silhouette" not in t2


def test_single_image_mode(pair, regions):
    _, current = pair
    p = build_prompt(PS, current, None, regions, prior_report="should not appear", indication="fever")
    assert p.single_image and [s.role for s in p.images] == ["current"]
    assert "Image 1: CURRENT, 2024-03-20, PA" in p.text and "single-image mode" in p.text
    assert "should not appear" not in p.text and "Region 1" not in p.text and "Clinical indication: fever" in p.text


def test_crops_take_same_coordinates_from_both_images():
    prior = np.zeros((100, 100), np.float32)
    current = np.zeros((100, 100), np.float32)
    current[40:50, 60:70] = 1.0  # new opacity, inside the bbox
    prior[0:10, 0:10] = 1.0  # something far away must not appear in the crop
    pc, cc = crop_pair(prior, current, (40, 60, 50, 70))
    assert pc.shape == cc.shape and pc.shape[0] == pc.shape[1] >= 10
    assert cc.max() == 255 and pc.max() == 0  # joint window: the change shows as brightness difference


def test_crop_clipped_at_border_and_volume_middle_slice():
    img = np.arange(50 * 40, dtype=np.float32).reshape(50, 40)
    pc, cc = crop_pair(img, img, (45, 35, 50, 40))
    assert pc.shape == cc.shape and np.array_equal(pc, cc)
    vol = np.stack([np.zeros((20, 20)), np.ones((20, 20)) * np.arange(20), np.zeros((20, 20))]).astype(np.float32)
    assert to_display(vol).max() == 255  # middle slice used


def test_rank_regions(regions):
    assert [r.zone for r in rank_regions(regions, 2)] == ["right lower zone", "left hilum"]
    assert rank_regions(regions, 0) == []


def test_display_is_uint8_and_robust_to_flat_or_nan():
    assert to_display(np.full((8, 8), 3.0)).max() == 0
    a = np.ones((8, 8), np.float32)
    a[0, 0] = np.nan
    a[1, 1] = 5
    out = to_display(a)
    assert out.dtype == np.uint8 and out.shape == (8, 8)
    assert isinstance(ImageSlot(out, "current").pixels, np.ndarray)
