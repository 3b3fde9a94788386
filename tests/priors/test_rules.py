"""Selection rules as pure functions over typed records: no network, no database."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from dicom_node import identity
from dicom_node.priors import rules
from dicom_node.priors.archive import parse_series, parse_study
from dicom_node.priors.model import MalformedResponse, SeriesRecord, StudyRecord
from dicom_node.priors.settings import ArchiveConfig, PriorSettings

DEFAULTS = PriorSettings()
PA = SeriesRecord("1.1", "DX", "CHEST", "CHEST PA", "1", views=frozenset({"PA"}))
LAT = SeriesRecord("1.2", "DX", "CHEST", "CHEST LAT", "2", views=frozenset({"LATERAL"}))
CURRENT = StudyRecord("9.9", "PAT1", "HOSP_A", "19600101", "20240601", "101500", "ACC", "XR CHEST PA",
                      frozenset({"DX"}), "local", series=(PA,))


def cand(uid="2.1", date="20231115", time="090000", modalities=("DX",), series=None, **fields) -> StudyRecord:
    values = {"patient_id": "PAT1", "issuer": "HOSP_A", "birth_date": "19600101", "study_date": date, "study_time": time,
                  "description": "XR CHEST PA", "modalities": frozenset(modalities), "archive": "pacs"}
    values.update(fields)
    return StudyRecord(uid, series=tuple(series) if series is not None else None, **values)


def series(uid="3.1", modality="DX", body_part="CHEST", views=("PA",), sides=(), description="", manufacturer="ACME", number="1"):
    return SeriesRecord(uid, modality, body_part, description, number, frozenset(views), frozenset(sides), manufacturer)


# --- study level -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "candidate, reason",
    [
        (cand(uid="9.9"), "the current study itself"),
        (cand(patient_id="PAT2"), "other patient: PatientID differs"),
        (cand(issuer="HOSP_B"), "other patient: IssuerOfPatientID 'HOSP_B', current study 'HOSP_A'"),
        (cand(issuer=""), "patient not certain: prior has no IssuerOfPatientID"),
        (cand(birth_date="19700101"), "other patient: PatientBirthDate differs"),
        (cand(date="2023"), "malformed archive answer: StudyDate '2023' is not a date"),
        (cand(date="20231341"), "malformed archive answer"),
        (cand(date="20240602"), "not earlier: after the current study"),
        (cand(date="20240601", time="120000"), "not earlier: same day, same time or later"),
        (cand(date="20240601", time="101500"), "not earlier: same day, same time or later"),
        (cand(date="20240601", time=""), "not strictly earlier: same day and StudyTime unknown"),
        (cand(date="20190531"), "outside the lookback window (5 years)"),
        (cand(modalities=("CT",)), "modality differs: CT, current DX"),
        (cand(modalities=("SR",)), "modality differs: SR, current DX"),
    ],
)
def test_study_rules_drop_with_the_rule_that_applies(candidate, reason):
    assert rules.study_rule(CURRENT, candidate, DEFAULTS).startswith(reason)


@pytest.mark.parametrize(
    "candidate",
    [
        cand(),
        cand(date="20240601", time="080000"),  # same day, strictly earlier
        cand(date="20190602"),  # just inside 5 years
        cand(modalities=("CR", "SR")),  # CR and DX are one modality group
        cand(modalities=()),  # ModalitiesInStudy not answered: decided at series level
        cand(patient_id=" PAT1 "),
    ],
)
def test_study_rules_keep_real_priors(candidate):
    assert rules.study_rule(CURRENT, candidate, DEFAULTS) is None


def test_study_rule_settings_change_the_outcome():
    assert rules.study_rule(CURRENT, cand(issuer=""), PriorSettings(accept_missing_issuer=True)) is None
    assert rules.study_rule(CURRENT, cand(date="20230501"), PriorSettings(lookback_years=1)).startswith("outside the lookback window (1 years)")
    assert rules.study_rule(CURRENT, cand(modalities=("CR",)), PriorSettings(modality_groups=[])).startswith("modality differs")
    assert rules.study_rule(CURRENT, cand(modalities=("CT",)), PriorSettings(match_modality=False)) is None


def test_current_study_without_a_valid_date_orders_nothing():
    undated = replace(CURRENT, study_date="")
    assert rules.study_rule(undated, cand(), DEFAULTS).startswith("current study has no valid StudyDate")


def test_one_patient_id_under_two_issuers_is_ambiguous_only_when_the_current_study_names_none():
    found = [cand(issuer="HOSP_A"), cand(uid="2.2", issuer="HOSP_B"), cand(uid="2.3", issuer="")]
    assert rules.ambiguous_issuers(CURRENT, found) is None
    message = rules.ambiguous_issuers(replace(CURRENT, issuer=""), found)
    assert message and "HOSP_A, HOSP_B" in message
    assert rules.ambiguous_issuers(replace(CURRENT, issuer=""), found[:1] + found[2:]) is None


# --- series level ------------------------------------------------------------------------------


def matching(candidate_series, current=CURRENT, settings=DEFAULTS):
    return rules.matching_series(current, cand(series=candidate_series), settings)


def test_series_rules_check_modality_body_part_view_and_laterality():
    assert matching([series(modality="CT", views=())])[1] == "modality differs: CT, current DX"
    assert matching([series(body_part="HAND")])[1] == "body part differs: HAND, current CHEST"
    assert matching([series(views=("AP",))])[1] == "view differs: AP, current PA"
    left = replace(CURRENT, series=(replace(PA, lateralities=frozenset({"L"})),))
    assert matching([series(sides=("R",))], current=left)[1] == "laterality differs: R, current L"
    assert matching([series(sides=("B",))], current=left)[1] is None
    assert matching([series(sides=())], current=left)[1] is None  # not recorded: not held against it


def test_series_rules_normalise_regions_and_views_and_respect_switches():
    lateral_current = replace(CURRENT, series=(LAT,))
    assert matching([series(body_part="THORAX", views=("LL",))], current=lateral_current)[1] is None
    assert matching([series(modality="CR")])[1] is None
    assert matching([series(body_part="")])[1] is None  # unknown body part passes
    assert matching([series(views=("AP",))], settings=PriorSettings(match_view=False))[1] is None
    assert matching([series(body_part="HAND")], settings=PriorSettings(match_body_part=False))[1] is None
    ct_current = replace(CURRENT, modalities=frozenset({"CT"}), series=(SeriesRecord("1.3", "CT", "CHEST", "AX 1mm", "3"),))
    assert matching([series(modality="CT", views=())], current=ct_current)[1] is None  # no view rule for CT


def test_the_nodes_own_results_are_never_priors_nor_reports():
    ours = series(uid="4.1", manufacturer=identity.MANUFACTURER)
    overlay = series(uid="4.2", description=identity.OVERLAY_SERIES_DESCRIPTION)
    assert matching([ours, overlay])[1] == "only the node's own result objects"
    assert matching([series(uid="4.3", modality="SR", views=())])[1] == "no image series (reports or other non-image objects only)"
    our_sr = series(uid="4.4", modality="SR", views=(), description=identity.RESULT_SERIES_DESCRIPTION)
    their_sr = series(uid="4.5", modality="SR", views=(), description="Radiology report")
    pdf = series(uid="4.6", modality="DOC", views=())
    assert [s.series_uid for s in rules.report_series(cand(series=[our_sr, their_sr, pdf, series()]))] == ["4.5", "4.6"]
    images, reason = matching([ours, series(uid="4.7")])
    assert reason is None and [s.series_uid for s in images] == ["4.7"]


def test_series_choice_follows_each_current_series_view_and_plane():
    prior = [series("5.1", views=("LATERAL",), description="LAT"), series("5.2", views=("PA",), description="PA"),
             series("5.3", views=("AP",), description="AP")]
    current = replace(CURRENT, series=(PA, LAT))
    chosen = rules.choose_series(current, prior, DEFAULTS)
    assert [s.series_uid for s in chosen] == ["5.2", "5.1"]

    axial = SeriesRecord("1.4", "CT", "CHEST", "Thorax 1.0 B31f", "2", plane=rules.plane_from_orientation([1, 0, 0, 0, 1, 0]))
    assert axial.plane == "AXIAL"
    assert rules.plane_from_orientation([0, 1, 0, 0, 0, -1]) == "SAGITTAL"
    assert rules.plane_from_orientation([1, 0, 0, 0, 0, -1]) == "CORONAL"
    ct_prior = [series("6.1", "CT", views=(), description="COR 3mm", number="3"),
                series("6.2", "CT", views=(), description="AX 1mm", number="2"),
                series("6.3", "CT", "ABDOMEN", views=(), description="AX 1mm abdomen", number="4")]
    ct_current = replace(CURRENT, modalities=frozenset({"CT"}), series=(axial,))
    assert [s.series_uid for s in rules.choose_series(ct_current, ct_prior, DEFAULTS)] == ["6.2"]


# --- ranking -----------------------------------------------------------------------------------


def test_rank_keeps_the_most_recent_n_and_optionally_the_oldest_as_baseline():
    found = [cand("7.1", "20200101"), cand("7.2", "20231115"), cand("7.3", "20220101"), cand("7.4", "20210101")]
    chosen, lost = rules.rank(CURRENT, found, PriorSettings(max_priors=2))
    assert [(c.study.study_uid, c.role) for c in chosen] == [("7.2", "recent"), ("7.3", "recent")]
    assert lost == {"7.4": "older than the 2 most recent matching prior(s)", "7.1": "older than the 2 most recent matching prior(s)"}
    chosen, lost = rules.rank(CURRENT, found, PriorSettings(include_baseline=True))
    assert [(c.study.study_uid, c.role) for c in chosen] == [("7.2", "recent"), ("7.1", "baseline")]
    assert set(lost) == {"7.3", "7.4"}
    chosen, _ = rules.rank(CURRENT, found[:1], PriorSettings(include_baseline=True))
    assert [c.role for c in chosen] == ["recent"]  # one prior is not also its own baseline


def test_description_similarity_breaks_ties_on_the_same_day():
    ribs = cand("8.1", "20231115", "160000", description="XR RIBS LEFT")
    chest = cand("8.2", "20231115", "080000", description="XR CHEST PA")
    chosen, _ = rules.rank(CURRENT, [ribs, chest], DEFAULTS)
    assert chosen[0].study.study_uid == "8.2"
    assert rules.similarity("XR CHEST PA", "xr chest pa") == 1.0 and rules.similarity("", "X") == 0.0


# --- archive answers ---------------------------------------------------------------------------


def identifier(**values) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_malformed_archive_answers_are_rejected_with_the_attribute_named():
    with pytest.raises(MalformedResponse, match="StudyInstanceUID missing"):
        parse_study(identifier(PatientID="PAT1", StudyDate="20230101"), "pacs")
    with pytest.raises(MalformedResponse, match="not a UID"):
        parse_study(identifier(StudyInstanceUID="1.2.abc", PatientID="PAT1"), "pacs")
    with pytest.raises(MalformedResponse, match="undecodable"):
        parse_series(None)
    study = parse_study(identifier(StudyInstanceUID="1.2.3", PatientID="PAT1", ModalitiesInStudy=["dx", "SR"]), "pacs")
    assert study.modalities == {"DX", "SR"} and study.instance_count is None and study.study_date == ""
    one = parse_series(identifier(SeriesInstanceUID="1.2.3.4", Modality="dx", ViewPosition="pa", ImageLaterality="L"))
    assert one.modality == "DX" and one.views == {"PA"} and one.lateralities == {"L"}


def test_settings_validate_archives_and_normalise_codes():
    with pytest.raises(ValidationError, match="needs dicomweb_url"):
        ArchiveConfig(name="web", method="dicomweb")
    with pytest.raises(ValidationError, match="needs ae_title and host"):
        ArchiveConfig(name="pacs", method="c-move")
    with pytest.raises(ValidationError, match="at least 1"):
        PriorSettings(max_priors=0)
    s = PriorSettings(modality_groups=[["cr", "dx"]], body_part_regions={"thorax": "chest"}, projection_modalities=["dx"])
    assert s.modality_groups == [["CR", "DX"]] and s.body_part_regions == {"THORAX": "CHEST"} and s.projection_modalities == ["DX"]
