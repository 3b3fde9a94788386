"""Stage artifacts round-trip through their JSON files, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import inference
from dicom_node.pipeline import artifacts
from dicom_node.priors.model import CandidateDecision, PriorRetrieval, PriorStudy
from dicom_node.refs import ImageRef, StudyRef
from dicom_node.storage import write_atomic
from inference.phantoms import make_chest_pair
from inference.pixels import image_from_dataset
from inference.serialize import result_to_dict
from inference.vlm.schema import DeviceFinding, Finding, VLMResult


def test_prior_retrieval_round_trips(tmp_path):
    retrieval = PriorRetrieval(
        "1.2.3",
        chosen=[PriorStudy("1.2.4", "20250101", "A1", "CHEST", "DX", "CHEST", ["1.2.4.1"], [tmp_path / "a.dcm"],
                           "Lungs clear.", "pacs", report_series_uids=["1.2.4.9"], report_paths=[tmp_path / "r.dcm"])],
        candidates=[CandidateDecision("1.2.4", "20250101", "DX", "CHEST", True, "kept: most recent", "pacs")],
        warnings=["one warning"], no_prior=False)
    path = tmp_path / artifacts.PRIORS_FILE
    artifacts.write_priors(path, retrieval)
    assert artifacts.read_priors(path) == retrieval
    assert isinstance(artifacts.read_priors(path).chosen[0].instance_paths[0], Path)


def test_comparison_round_trips_with_its_overlay_apart(tmp_path):
    pair = make_chest_pair(4, "new_nodule", size=256)
    result = inference.compare(image_from_dataset(pair.current), [image_from_dataset(pair.prior)])
    assert result.regions and result.overlay is not None
    vlm = VLMResult(findings=[Finding("nodule", result.regions[0].zone, "new", "moderate", "new opacity", 0.7)],
                    devices=[DeviceFinding("line", "unchanged")], impression="New nodule.", flags=["x"], model="m")
    ref = ImageRef("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.1", "1.2.3.9", "1.2.3")
    comparison = artifacts.Comparison(StudyRef("1.2.3", "20261120", "A2", "CHEST", [ref]), [], [ref],
                                      pair.current.to_json_dict(), result, vlm, None, "Lungs clear.", "engine", "v1",
                                      {"job": "k"})
    path = tmp_path / artifacts.COMPARISON_FILE
    artifacts.write_comparison(path, comparison)
    back = artifacts.read_comparison(path)
    assert result_to_dict(back.result) == result_to_dict(result)  # every documented field
    assert back.result.overlay is None  # kept as PNG, not in JSON
    assert (back.vlm, back.current, back.slice_refs, back.prior_report) == (vlm, comparison.current, [ref], "Lungs clear.")


def test_a_missing_artifact_says_to_run_the_job_again(tmp_path):
    with pytest.raises(artifacts.ArtifactMissing, match="dicom-node retry"):
        artifacts.read_priors(tmp_path / "gone.json")


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "x.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["x.json"]
