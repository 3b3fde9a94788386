"""The prompt gives the model the finding's measured trajectory, in date order, with the dates."""

import dataclasses
import datetime as dt

from inference.types import Timepoint
from inference.vlm.prompting import build_prompt, load_prompt_set


def test_measured_trajectory_in_date_order(pair, regions):
    prior, current = pair
    steps = (Timepoint(dt.date(2023, 1, 10), "s0", "i0", True, 5.0, 4.0, 18.0),
             Timepoint(dt.date(2024, 1, 10), "s1", "i1", True, 9.0, 8.0, 60.0),
             Timepoint(dt.date(2024, 3, 20), "s2", "i2", True, 16.0, 14.0, 202.0))
    grown = dataclasses.replace(regions[0], timepoints=steps, trend="worsened", lesion_type="focal opacity")
    text = build_prompt(load_prompt_set("chest_compare_v1"), current, prior, [grown]).text
    line = next(row for row in text.splitlines() if row.startswith("Region 1"))
    assert "focal opacity measured 2023-01-10: 5.0 x 4.0 mm -> 2024-01-10: 9.0 x 8.0 mm -> 2024-03-20: 16.0 x 14.0 mm" in line
    assert "trend worsened" in line
    absent = dataclasses.replace(grown, timepoints=(dataclasses.replace(steps[0], present=False, long_axis_mm=None),
                                                    steps[2]), trend="new")
    assert "2023-01-10: absent -> 2024-03-20: 16.0 x 14.0 mm" in build_prompt(
        load_prompt_set("chest_compare_v1"), current, prior, [absent]).text


def test_older_priors_images_come_first_in_date_order_each_dated(pair, regions, torch_vlms):
    prior, current = pair
    oldest = dataclasses.replace(prior, acquired_on=dt.date(2022, 1, 5), source="oldest")
    older = dataclasses.replace(prior, acquired_on=dt.date(2023, 1, 10), source="older")
    prompt = build_prompt(load_prompt_set("chest_compare_v1"), current, prior, regions[:1], older=[oldest, older])
    images = [row for row in prompt.text.splitlines() if row.startswith("<image:")]
    assert images[:4] == ["<image:prior>"] * 3 + ["<image:current>"]  # three priors, then the current
    text = prompt.text
    dated = [text.index(d) for d in ("2022-01-05", "2023-01-10", "2024-01-10", "2024-03-20")]
    assert dated == sorted(dated)
    assert text.count("OLDER PRIOR image") == 2
    # and a real (tiny) model takes the four images: its adapter encodes one block per image
    vlm = torch_vlms["gemma3"]
    from inference.vlm import CompareRequest

    request = CompareRequest(current, prior, tuple(regions[:1]), older_priors=(oldest, older))
    encoded = vlm.backend.adapter.encode(vlm.prompt(request))
    assert encoded.pixel_values.shape[0] == len(vlm.prompt(request).images) == 6  # 4 images + 1 crop pair
