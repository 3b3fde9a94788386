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
