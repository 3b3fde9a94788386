"""The reading: one merge of regions and model findings, read by both the SR and the HL7 ORU."""

from __future__ import annotations

from dataclasses import replace

import hl7

from dicom_node.refs import ImageRef
from dicom_node.report import ReportSettings, build_sr
from dicom_node.report.reading import Reading, build_reading
from dicom_node.worklist import WorklistResult, oru_message
from inference.vlm.schema import Finding, VLMResult

from .conftest import compared, make_input
from .test_sr import groups, values

SNOMED_NEW, SNOMED_STABLE = "52101004", "260388006"


def oru_for(reading: Reading, study_uid: str) -> hl7.Message:
    result = WorklistResult("P1", "", "Doe^J", "19600101", "A1", study_uid, "20261120120000", reading.impression,
                            reading.changes, reading.sr_sop_instance_uid or "1.2.3", "job", correction=reading.is_revision)
    return hl7.parse(oru_message(result, "DICOM_NODE", "RIS"))


def obx(message: hl7.Message, code: str):
    return [seg for seg in message.segments("OBX") if str(seg[3][0][0]) == code][0]


def test_sr_and_oru_say_the_same_when_model_and_measurement_disagree():
    current, prior, result = compared("new_nodule")
    [region] = result.regions
    assert region.status == "new"
    # The model calls the measured new nodule stable, and adds nothing else.
    vlm = VLMResult(findings=[Finding("pulmonary nodule", region.zone, "stable", "mild", "unchanged", 0.6)],
                    impression="No change.", model="tiny")
    reading = build_reading(str(current.StudyInstanceUID), result, vlm)
    assert [(f.category, f.status, f.region is region) for f in reading.findings] == [("finding", "stable", True)]
    sr = build_sr(replace(make_input(current, prior, result, vlm), reading=reading), ReportSettings())
    [group] = groups(sr)
    assert values(group, "Description of Change") == [SNOMED_STABLE]
    message = oru_for(reading, str(current.StudyInstanceUID))
    assert (str(obx(message, "PRIO")[5]), str(obx(message, "PRIO")[8])) == ("routine", "N")  # not "new, urgent"
    assert str(obx(message, "IMP")[5]) == "No change."


def test_without_a_model_both_report_the_measured_change():
    current, prior, result = compared("new_nodule")
    reading = build_reading(str(current.StudyInstanceUID), result, None)
    sr = build_sr(replace(make_input(current, prior, result), reading=reading), ReportSettings())
    assert [values(g, "Description of Change") for g in groups(sr)] == [[SNOMED_NEW]]
    message = oru_for(reading, str(current.StudyInstanceUID))
    assert str(obx(message, "PRIO")[8]) == "A"
    assert reading.impression == result.summary
    assert reading.impression in [v for _, v in sr_texts(sr, "Impression")]


def sr_texts(sr, name: str) -> list[tuple[str, str]]:
    from .test_sr import walk

    return [(n, v) for _, n, v, _ in walk(sr.ContentSequence) if n == name]


def test_a_revision_keeps_tracking_uids_names_its_predecessor_and_is_a_correction():
    current, prior, result = compared("new_nodule")
    study = str(current.StudyInstanceUID)
    first = build_reading(study, result, None)
    first.sr_sop_instance_uid, first.sr_series_uid = "1.2.3.4.1", "1.2.3.4"
    again = Reading.from_json(first.to_json())  # round-trips as the report stage stores it
    assert again == first

    revised = build_reading(study, result, None, predecessor=again)
    revised.predecessor_sr = ImageRef("1.2.840.10008.5.1.4.1.1.88.34", again.sr_sop_instance_uid, again.sr_series_uid, study)
    assert revised.revision == 2 and revised.is_revision
    assert [f.tracking_uid for f in revised.findings] == [f.tracking_uid for f in first.findings]

    inp = replace(make_input(current, prior, result, key_suffix="|rev2"), reading=revised,
                  predecessor=revised.predecessor_sr, instance_number=revised.revision)
    sr = build_sr(inp, ReportSettings())
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == "1.2.3.4.1"
    assert sr.InstanceNumber == 2
    assert any("Revised report" in v for _, v in sr_texts(sr, "Comment"))
    message = oru_for(revised, study)
    assert str(message.segment("OBR")[25]) == "C" and str(obx(message, "IMP")[11]) == "C"
    assert str(oru_for(first, study).segment("OBR")[25]) == "F"
