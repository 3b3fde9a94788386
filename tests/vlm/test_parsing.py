import json

import pytest

from inference.types import ChangeRegion
from inference.vlm.parsing import parse_output
from inference.vlm.schema import FLAG_COERCED, FLAG_DROPPED, FLAG_REPAIRED, FLAG_UNUSABLE

REGIONS = [
    ChangeRegion("right lower zone", (0, 0, 5, 5), 420.0, 31.5, 0.42, "worsened", 0.9),
    ChangeRegion("left hilum", (0, 0, 5, 5), 60.0, 9.0, -0.15, "improved", 0.6),
]
GOOD = {
    "findings": [
        {"finding": "pleural effusion", "region": "left costophrenic angle", "change": "Increased",
         "severity": "small", "evidence": "blunting of the angle", "confidence": 0.8},
        {"finding": "consolidation", "region": "right lower zone", "change": "no change",
         "severity": "moderate", "evidence": "unchanged opacity", "confidence": 85},
    ],
    "devices": [{"device": "NG tube", "status": "withdrawn"}, {"device": "ETT", "status": "in place"}],
    "impression": "Left effusion has increased.",
    "priority": "urgent",
}


def test_valid_output_normalises_synonyms():
    r = parse_output("Here you go:\n```json\n" + json.dumps(GOOD) + "\n```", REGIONS)
    assert r.usable and r.flags == []
    assert [f.change for f in r.findings] == ["worsened", "stable"]
    assert [f.severity for f in r.findings] == ["mild", "moderate"]
    assert r.findings[1].confidence == pytest.approx(0.85)
    assert [(d.device, d.status) for d in r.devices] == [("NG tube", "removed"), ("ETT", "unchanged")]
    assert r.priority == "urgent" and r.impression.startswith("Left effusion")
    assert all(f.source == "vlm" for f in r.findings)


def test_truncated_output_is_repaired_keeping_complete_items():
    text = json.dumps(GOOD)
    cut = text[: text.index('"consolidation"') + 20]  # ends inside the second finding
    r = parse_output(cut, REGIONS)
    assert r.usable and FLAG_REPAIRED in r.flags
    assert r.findings[0].finding == "pleural effusion"
    assert r.findings[0].change == "worsened"


def test_trailing_commas_and_python_literals_repaired():
    r = parse_output('{"findings": [], "devices": [], "impression": "clear", "priority": "routine", "x": None,}', REGIONS)
    assert r.usable and FLAG_REPAIRED in r.flags and r.impression == "clear"


@pytest.mark.parametrize("raw", ["", "���\x00garbage tokens ]]}{", "The lungs are clear.", "[1, 2, 3]",
                                 '{"findings": "none", "impression": "x"}', '{"unrelated": 1}'])
def test_garbage_falls_back_to_measurements(raw):
    r = parse_output(raw, REGIONS)
    assert not r.usable and r.flags == [FLAG_UNUSABLE]
    assert [(f.region, f.change, f.source) for f in r.findings] == [
        ("right lower zone", "worsened", "measurement"), ("left hilum", "improved", "measurement")]
    assert "420 mm2" in r.findings[0].evidence
    assert r.priority == "urgent"  # measured worsening still reaches the worklist
    assert r.raw_output == raw


def test_fallback_without_regions_is_routine():
    r = parse_output("nonsense", [])
    assert not r.usable and r.findings == [] and r.priority == "routine"


def test_unknown_vocabulary_is_coerced_and_bad_items_dropped():
    doc = {"findings": [{"finding": "nodule", "change": "mysterious", "severity": "huge", "confidence": "high"},
                        {"region": "no finding text"}, "string item"],
           "devices": [{"device": "PICC", "status": "wobbly"}], "impression": "", "priority": "asap"}
    r = parse_output(json.dumps(doc), REGIONS)
    assert r.usable
    assert FLAG_COERCED in r.flags and FLAG_DROPPED in r.flags
    assert [(f.finding, f.change, f.severity, f.confidence) for f in r.findings] == [("nodule", "indeterminate", "indeterminate", 0.0)]
    assert r.devices == [] and r.priority == "routine"


def test_to_dict_round_trips_through_json():
    r = parse_output(json.dumps(GOOD), REGIONS)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["findings"][0]["change"] == "worsened" and d["devices"][0]["status"] == "removed"
