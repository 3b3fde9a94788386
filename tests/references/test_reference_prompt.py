"""The VLM prompt with no prior: the query next to matched normals, each role stated."""

from __future__ import annotations

import numpy as np

from inference.types import ChangeRegion, ImageInput
from inference.vlm.model import CompareRequest
from inference.vlm.prompting import build_prompt, load_prompt_set

PS = load_prompt_set("chest_compare_v1")


def _image(seed: int) -> ImageInput:
    pixels = np.random.default_rng(seed).random((64, 64), dtype=np.float32)
    return ImageInput(pixels, (1.0, 1.0), modality="DX", body_part="CHEST", view="PA")


def test_query_then_normal_references_with_roles_and_no_change_claim():
    region = ChangeRegion("right upper zone", (10, 10, 20, 20), 120.0, 14.0, 0.05, "present", 0.8, kind="increase")
    refs = ((_image(2), "same DX CHEST PA; sex M matches; rank 1 of 20"), (_image(3), "same DX CHEST PA; rank 2 of 20"))
    p = build_prompt(PS, _image(1), None, [region], references=refs)
    t = p.text
    assert [s.role for s in p.images] == ["current", "reference", "reference"]
    assert t.index("Image 1: CURRENT") < t.index("<image:current>") < t.index(
        "Image 2: NORMAL REFERENCE, another person, matched by same DX CHEST PA; sex M matches; rank 1 of 20") \
        < t.index("Image 3: NORMAL REFERENCE, another person, matched by same DX CHEST PA; rank 2 of 20")
    assert "They are not the patient" in t and "No change over time" in t and "prior study of the same patient" not in t
    assert "deviates beyond the variation of the normal references" in t and "measured as present" in t
    assert p.single_image


def test_a_prior_wins_over_references_and_the_request_carries_them():
    refs = ((_image(2), "rank 1"),)
    assert "NORMAL REFERENCE" not in build_prompt(PS, _image(1), _image(4), [], references=refs).text
    assert CompareRequest(_image(1), None, references=refs).references == refs
