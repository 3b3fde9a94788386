"""The SR: TID 1500 content per change type, refusal and no-prior reports, determinism, validity."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node import identity
from dicom_node.report import CHANGE_CODES, ImageRef, ReportSettings, build_overlay_sc, build_sr, tracking_uid
from dicom_node.report.sr import device_uid
from inference.types import CHANGE_STATUSES, ChangeRegion
from inference.vlm.schema import FLAG_UNUSABLE, VLMResult

from tests.support.validation import assert_valid_dicom

from .conftest import CHANGES, compared, make_input, vlm_for

SNOMED_CHANGE = {"new": "52101004", "resolved": "2667000", "worsened": "35105006", "improved": "1250004",
                 "stable": "260388006"}


def walk(items, depth=0):
    """(depth, concept meaning, value) for every content item, depth first."""
    for item in items:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        vt = item.ValueType
        if vt == "CODE":
            value = item.ConceptCodeSequence[0].CodeValue
        elif vt == "TEXT":
            value = item.TextValue
        elif vt == "NUM":
            mv = item.MeasuredValueSequence[0]
            value = (float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue)
        elif vt == "UIDREF":
            value = item.UID
        elif vt == "IMAGE":
            value = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        elif vt == "SCOORD":
            value = (item.GraphicType, list(item.GraphicData))
        else:
            value = None
        yield depth, name, value, item
        if "ContentSequence" in item:
            yield from walk(item.ContentSequence, depth + 1)


def groups(sr: Dataset) -> list[list[tuple]]:
    out = []
    for _, name, _, item in walk(sr.ContentSequence):
        if name == "Measurement Group":
            out.append([(n, v) for _, n, v, _ in walk(item.ContentSequence)])
    return out


def values(items, name):
    return [v for n, v in items if n == name]


def evidence_uids(sr: Dataset, attribute: str) -> set[str]:
    return {sop.ReferencedSOPInstanceUID for study in sr.get(attribute, [])
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}


@pytest.mark.parametrize("status", CHANGE_STATUSES)
def test_each_change_status_is_coded(cases, status, tmp_path):
    """The vocabulary -> SNOMED CT table, independent of what the phantom analysis happens to measure."""
    case = cases["new_nodule"]
    region = ChangeRegion(zone="right upper zone", bbox=(60, 50, 80, 72), area_mm2=250.0, longest_diameter_mm=20.0,
                          mean_change=0.3, status=status, confidence=0.9, kind="increase")
    comparison = replace(case.inp.comparison, regions=[region])
    sr = build_sr(replace(case.inp, comparison=comparison, vlm=vlm_for(comparison)), ReportSettings())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert_valid_dicom(tmp_path / "sr.dcm")
    [group] = [g for g in groups(sr) if values(g, "Image Region")]
    expected = {**SNOMED_CHANGE, "indeterminate": "373068000"}[status]
    assert values(group, "Description of Change") == [expected] == [CHANGE_CODES[status].value]
    assert values(group, "Finding Site") == ["281392002"] and values(group, "Laterality") == ["24028007"]


@pytest.mark.parametrize("change", list(CHANGES))
def test_change_report_content_and_validity(cases, change, tmp_path):
    case = cases[change]
    sr = build_sr(case.inp, ReportSettings())
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    dump = assert_valid_dicom(path)
    assert "Imaging Measurement Report" in dump

    # Header: the current study, unverified, the algorithm as contributing equipment
    assert sr.StudyInstanceUID == case.current.StudyInstanceUID
    assert sr.PatientID == case.current.PatientID and sr.AccessionNumber == case.current.AccessionNumber
    assert sr.Modality == "SR" and sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.SeriesDescription == identity.RESULT_SERIES_DESCRIPTION
    ours = [e for e in sr.ContributingEquipmentSequence if e.get("DeviceUID")]
    assert ours and ours[0].Manufacturer == identity.MANUFACTURER
    assert ours[0].DeviceUID == device_uid("tiny-test-model", "1.0")
    assert "1.0" in ours[0].SoftwareVersions

    # Evidence: current study in Current Requested Procedure Evidence, prior in Pertinent Other Evidence
    assert evidence_uids(sr, "CurrentRequestedProcedureEvidenceSequence") == {case.current.SOPInstanceUID}
    assert evidence_uids(sr, "PertinentOtherEvidenceSequence") == {case.prior.SOPInstanceUID}

    tree = [(n, v) for _, n, v, _ in walk(sr.ContentSequence)]
    assert ("Language of Content Item and Descendants", "en-US") in tree
    assert ("Observer Type", "121007") in tree  # device observer
    assert ("Procedure reported", "399208008") in tree
    assert ("Study Date", "2023-06-01") in tree and ("Accession Number", case.prior.AccessionNumber) in tree
    assert any(n == "Comment" and "comparison interval 366 days" in v for n, v in tree)
    assert any(n == "Impression" and v for n, v in tree)

    found = groups(sr)
    lesions = [g for g in found if "49062001" not in values(g, "Finding")]
    current_groups = [g for g in lesions if values(g, "Description of Change")]  # the change sits on the current one
    regions = case.inp.comparison.regions  # what the analysis measured (its accuracy is tested in tests/inference)
    # TID 1600: every image the report refers to is in the Image Library
    library = [item for _, n, _, item in walk(sr.ContentSequence) if n == "Image Library"]
    assert library and {v for _, n, v, _ in walk(library[0].ContentSequence) if isinstance(v, str) and v.startswith("1.")} \
        >= {case.current.SOPInstanceUID, case.prior.SOPInstanceUID}
    if not regions:
        assert not lesions  # nothing changed: no finding, and the report says so; the device is still listed
        assert any(n == "Comment" and "No measurable change" in str(v) for n, v in tree)
    else:
        assert len(current_groups) == len(regions)  # one finding per measured region, in the analysis' order
        g = current_groups[0]
        region = regions[0]
        uid = values(g, "Tracking Unique Identifier")[0]
        assert uid == tracking_uid(case.current.StudyInstanceUID, region.zone, "27925004")
        same = [x for x in lesions if values(x, "Tracking Unique Identifier") == [uid]]
        # one group per time point where the finding is present (and always the current one)
        assert len(same) == sum(t.present for t in region.timepoints[:-1]) + 1
        assert values(g, "Description of Change") == [SNOMED_CHANGE[region.status]]
        assert values(g, "Finding")[0] == "27925004"  # nodule
        assert values(g, "Finding Site")[0] in ("281392002", "281393007", "281394001")
        assert values(g, "Laterality")[0] in ("24028007", "7771000")
        assert values(g, "Algorithm Name") and values(g, "Algorithm Version")[0] == "1.0"
        assert values(g, "Time Point") == ["2024-06-01"] and not values(g, "Time Point Type")
        assert any("compared with the prior" in str(v) for v in values(g, "Comment"))
        before, now = region.timepoints
        checks = [(g, now, case.current.SOPInstanceUID)]
        if before.present:
            checks.append((same[0], before, case.prior.SOPInstanceUID))
        for group, tp, image in checks:
            if not tp.present:
                assert not values(group, "Long axis") and not values(group, "Image Region")
                continue
            units = {n: v[1] for n, v in group if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str)
                     and n in ("Long axis", "Short axis", "Area")}
            assert units == {"Long axis": "mm", "Short axis": "mm", "Area": "mm2"}  # no unitless "signal change"
            assert values(group, "Long axis")[0][0] == pytest.approx(tp.long_axis_mm)
            assert values(group, "Area")[0][0] == pytest.approx(tp.area_mm2)
            assert set(values(group, "Source of Measurement")) == {image}  # measured on that time point's image
            graphic_type, points = values(group, "Image Region")[0]
            assert graphic_type == "POLYLINE" and points[:2] == points[-2:]  # closed outline
        if before.present:
            assert values(same[0], "Time Point") == ["2023-06-01"] and values(same[0], "Time Point Type") == ["C1442488"]
        # the region of the current group is on the current image, near the region of change
        if now.present:
            _, points = values(g, "Image Region")[0]
            r0, c0, r1, c1 = region.bbox
            xs, ys = np.array(points[0::2]), np.array(points[1::2])
            assert c0 - 2 <= xs.mean() <= c1 + 2 and r0 - 2 <= ys.mean() <= r1 + 2
    devices = [g for g in found if "49062001" in values(g, "Finding")]
    assert len(devices) == 1 and values(devices[0], "Description of Change") == ["260388006"]


def test_refusal_report_says_why(cases, tmp_path):
    case = cases["refused"]
    sr = build_sr(case.inp, ReportSettings())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert_valid_dicom(tmp_path / "sr.dcm")
    tree = [(n, v) for _, n, v, _ in walk(sr.ContentSequence)]
    assert not groups(sr)
    statement = [v for n, v in tree if n == "Comment" and v.startswith("Comparison not performed")]
    assert statement and "implausible_spacing" in statement[0]
    # the refused prior is still cited as evidence: the reader sees what was refused
    assert evidence_uids(sr, "PertinentOtherEvidenceSequence") == {case.prior.SOPInstanceUID}


def test_no_prior_report(cases, tmp_path):
    case = cases["no_prior"]
    sr = build_sr(case.inp, ReportSettings(language="de-DE"))
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert_valid_dicom(tmp_path / "sr.dcm")
    tree = [(n, v) for _, n, v, _ in walk(sr.ContentSequence)]
    assert any(n == "Comment" and v.startswith("No prior study available") for n, v in tree)
    assert ("Language of Content Item and Descendants", "de-DE") in tree
    assert "PertinentOtherEvidenceSequence" not in sr
    assert evidence_uids(sr, "CurrentRequestedProcedureEvidenceSequence") == {case.current.SOPInstanceUID}


def test_same_inputs_same_uids_and_stable_tracking_across_reanalysis(cases):
    case = cases["growing_nodule"]
    first, again = build_sr(case.inp, ReportSettings()), build_sr(case.inp, ReportSettings())
    assert first.SOPInstanceUID == again.SOPInstanceUID and first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.SOPInstanceUID.startswith(identity.UID_ROOT)

    # Re-analysis with a new model version: new SR, same series, lists the first one, same tracking UIDs
    predecessor = ImageRef(first.SOPClassUID, first.SOPInstanceUID, first.SeriesInstanceUID, first.StudyInstanceUID)
    newer = build_sr(replace(case.inp, model_version="2.0", input_key=case.inp.input_key + "|2.0",
                             predecessor=predecessor, instance_number=2), ReportSettings())
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert newer.SeriesInstanceUID == first.SeriesInstanceUID
    pred = newer.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == first.SOPInstanceUID
    track = lambda sr: sorted({v for g in groups(sr) for v in values(g, "Tracking Unique Identifier")})  # noqa: E731
    findings = len(case.inp.comparison.regions) + 1  # and the device
    assert track(newer) == track(first) and len(track(first)) == findings
    # a new model version is a new device
    dev = lambda sr: [e.DeviceUID for e in sr.ContributingEquipmentSequence if e.get("DeviceUID")]  # noqa: E731
    assert dev(newer) != dev(first)


def test_measured_regions_without_model_output_and_unusable_model_output(cases, tmp_path):
    case = cases["new_nodule"]
    for vlm in (None, VLMResult(flags=[FLAG_UNUSABLE], raw_output="not json")):
        sr = build_sr(replace(case.inp, vlm=vlm), ReportSettings())
        sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
        assert_valid_dicom(tmp_path / "sr.dcm")
        found = groups(sr)
        assert len(found) == 1 and values(found[0], "Finding")[0] == "365853002"  # imaging finding, measured
        assert values(found[0], "Description of Change") == ["52101004"]
    tree = [(n, v) for _, n, v, _ in walk(sr.ContentSequence)]
    assert any(n == "Comment" and FLAG_UNUSABLE in v for n, v in tree)


def test_every_vocabulary_term_and_odd_findings_are_valid(cases, tmp_path):
    """indeterminate, a finding without a measured region, two findings in one zone, a long text, a volume."""
    case = cases["new_nodule"]
    region = ChangeRegion(zone="left lower zone", bbox=(10, 20, 30, 40), area_mm2=120.0, longest_diameter_mm=14.0,
                          mean_change=-0.2, status="indeterminate", confidence=0.4, volume_mm3=900.0, kind="decrease")
    comparison = replace(case.inp.comparison, regions=[region])
    vlm = vlm_for(comparison)
    vlm.findings.append(replace(vlm.findings[0], finding="pleural effusion", change="new", evidence="x" * 6000))
    vlm.findings.append(replace(vlm.findings[0], region="cardiac/mediastinal", change="improved"))
    sr = build_sr(replace(case.inp, comparison=comparison, vlm=vlm), ReportSettings())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert_valid_dicom(tmp_path / "sr.dcm")
    found = groups(sr)
    changes = sorted(v for g in found for v in values(g, "Description of Change"))
    assert changes == sorted([CHANGE_CODES[s].value for s in ("indeterminate", "new", "improved")] + ["260388006"])
    assert any(values(g, "Volume") == [(900.0, "mm3")] for g in found)
    tracking = [v for g in found for v in values(g, "Tracking Unique Identifier")]
    assert len(set(tracking)) == len(tracking)
    assert all(len(v) <= 4000 for g in found for v in values(g, "Comment"))
    assert any(values(g, "Finding Site") == ["72410000"] for g in found)  # mediastinum


def test_refuses_a_current_dataset_from_another_study(cases):
    case = cases["new_nodule"]
    with pytest.raises(ValueError, match="belongs to study"):
        build_sr(replace(case.inp, current_dataset=cases["no_prior"].current), ReportSettings())


def test_overlay_secondary_capture(cases, tmp_path):
    case = cases["growing_nodule"]
    assert build_overlay_sc(case.inp, ReportSettings()) is None  # off by default
    assert build_overlay_sc(cases["refused"].inp, ReportSettings(overlay_sc_enabled=True)) is None
    sc = build_overlay_sc(case.inp, ReportSettings(overlay_sc_enabled=True))
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    assert_valid_dicom(tmp_path / "sc.dcm")
    back = dcmread(tmp_path / "sc.dcm")
    overlay = case.inp.comparison.overlay
    assert back.StudyInstanceUID == case.current.StudyInstanceUID and back.PatientID == case.current.PatientID
    assert back.SeriesDescription == identity.OVERLAY_SERIES_DESCRIPTION and back.BurnedInAnnotation == "YES"
    pixels = back.pixel_array
    assert pixels.shape[1:] == overlay.shape[1:] and pixels.shape[0] > overlay.shape[0]  # legend band below
    assert np.array_equal(pixels[: overlay.shape[0]], overlay)
    assert pixels[overlay.shape[0]:].any()  # the legend is drawn
    assert back.SOPInstanceUID == build_overlay_sc(case.inp, ReportSettings(overlay_sc_enabled=True)).SOPInstanceUID


def test_real_comparison_of_another_seed_is_valid(tmp_path):
    """A second, independent pair through compare() -> SR, so the checks do not hinge on one seed."""
    cur, pri, result = compared("new_nodule", seed=11)
    sr = build_sr(make_input(cur, pri, result, vlm_for(result)), ReportSettings())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert_valid_dicom(tmp_path / "sr.dcm")
    assert result.regions  # the 8.6 mm new nodule is found
    # one group per region per time point where it is present (and always the current), plus the device
    expected = sum(sum(tp.present or k == len(r.timepoints) - 1 for k, tp in enumerate(r.timepoints)) or 1
                   for r in result.regions)
    assert len(groups(sr)) == expected + 1
