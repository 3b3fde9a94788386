"""The quickstart's growing nodule through the real stack (Orthanc as the PACS, Redis, workers): the SR
that comes back holds the nodule's size at both time points under one Tracking UID, with an Image
Library, and validates."""

from __future__ import annotations

from dicom_node.local_stack.scenario import acquire, seed_pacs, wait_for_report, write_history
from tests.support.validation import assert_valid_dicom

MEASUREMENT_GROUP, IMAGE_LIBRARY = "125007", "111028"


def _code(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""


def _items(items):
    for item in items:
        yield item
        yield from _items(item.get("ContentSequence", []))


def test_growing_nodule_sr_holds_both_sizes_under_one_tracking_uid(stack, tmp_path):
    scenario = write_history(tmp_path / "data", "growing_nodule", size=512)
    seed_pacs(stack.orthanc, scenario)
    acquire(stack.orthanc, scenario)
    sr = wait_for_report(stack.orthanc, scenario.current_study_uid, timeout=150)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid_dicom(path)

    library = [i for i in _items(sr.ContentSequence) if _code(i) == IMAGE_LIBRARY]
    listed = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in _items(library[0].ContentSequence)
              if i.ValueType == "IMAGE"} if library else set()
    current_image = [p for p in scenario.files["current"]][0]
    from pydicom import dcmread

    current_uid = dcmread(current_image, stop_before_pixels=True).SOPInstanceUID
    prior_uid = dcmread(scenario.files["prior-2025-PA"][0], stop_before_pixels=True).SOPInstanceUID
    assert {current_uid, prior_uid} <= listed

    by_uid: dict[str, list[dict]] = {}
    for group in (i for i in _items(sr.ContentSequence) if i.ValueType == "CONTAINER" and _code(i) == MEASUREMENT_GROUP):
        entry = {"sizes": {}, "time point": None, "image": None}
        for item in _items(group.ContentSequence):
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "UIDREF" and name == "Tracking Unique Identifier":
                uid = item.UID
            elif item.ValueType == "NUM":
                entry["sizes"][name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "TEXT" and name == "Time Point":
                entry["time point"] = item.TextValue
            elif item.ValueType == "IMAGE" and name == "Source of Measurement":
                entry["image"] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        by_uid.setdefault(uid, []).append(entry)
    measured = {uid: groups for uid, groups in by_uid.items() if sum(bool(g["sizes"]) for g in groups) == 2}
    assert measured, by_uid
    [(uid, groups)] = list(measured.items())[:1]
    before, now = [g for g in groups if g["sizes"]]
    assert (before["time point"], now["time point"]) == ("2025-11-18", "2026-11-20")
    assert (before["image"], now["image"]) == (prior_uid, current_uid)
    assert 5.0 < before["sizes"]["Long axis"] < now["sizes"]["Long axis"]  # the nodule grew
    assert now["sizes"]["Area"] > before["sizes"]["Area"] and "Short axis" in now["sizes"]
