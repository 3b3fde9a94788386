"""Codes the SR uses: the change vocabulary mapped onto SNOMED CT, finding and site codes, procedures.

The change mapping (DESIGN.md "Change vocabulary") is written as a qualitative evaluation
(DCM 111021 "Description of Change") in each measurement group:

| node vocabulary | SNOMED CT code | meaning            | why                                              |
| --------------- | -------------- | ------------------ | ------------------------------------------------ |
| new             | 52101004       | Present            | present now, absent on the prior                 |
| resolved        | 2667000        | Absent             | absent now, present on the prior                 |
| worsened        | 35105006       | Increased          | larger / denser / more extensive than the prior  |
| improved        | 1250004        | Decreased          | smaller / less dense than the prior              |
| stable          | 260388006      | No status change   | same as the prior                                |
| indeterminate   | 373068000      | Undetermined       | the comparison could not decide                  |
| device placed   | 52101004       | Present            | device present now, not on the prior             |
| device removed  | 2667000        | Absent             | device on the prior, not now                     |
| device repositioned | 263703002  | Changed status     | present on both, in a different position         |
| device unchanged | 260388006     | No status change   | present on both, same position                   |
"""

from __future__ import annotations

import re

from highdicom.sr import CodedConcept, FindingSite
from pydicom.sr.coding import Code

PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
INCREASED = Code("35105006", "SCT", "Increased")
DECREASED = Code("1250004", "SCT", "Decreased")
NO_STATUS_CHANGE = Code("260388006", "SCT", "No status change")
UNDETERMINED = Code("373068000", "SCT", "Undetermined")
CHANGED_STATUS = Code("263703002", "SCT", "Changed status")

CHANGE_CODES: dict[str, Code] = {
    "new": PRESENT,
    "resolved": ABSENT,
    "worsened": INCREASED,
    "improved": DECREASED,
    "stable": NO_STATUS_CHANGE,
    "indeterminate": UNDETERMINED,
    "present": PRESENT,  # against normal references of other people: atypical now, no claim about time
}
DEVICE_CODES: dict[str, Code] = {
    "placed": PRESENT,
    "removed": ABSENT,
    "repositioned": CHANGED_STATUS,
    "unchanged": NO_STATUS_CHANGE,
}

# Concept names
DESCRIPTION_OF_CHANGE = Code("111021", "DCM", "Description of Change")
FINDING = Code("121071", "DCM", "Finding")
COMMENT = Code("121106", "DCM", "Comment")
IMPRESSION = Code("121073", "DCM", "Impression")
STUDY_DATE = Code("111060", "DCM", "Study Date")
ACCESSION_NUMBER = Code("121022", "DCM", "Accession Number")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
AREA = Code("42798000", "SCT", "Area")
LONG_AXIS = Code("103339001", "SCT", "Long axis")
SHORT_AXIS = Code("103340004", "SCT", "Short axis")
BASELINE = Code("C1442488", "UMLS", "Baseline")  # CID 6146 Time Point Types
VOLUME = Code("118565006", "SCT", "Volume")
MEAN_INTENSITY_CHANGE = Code("113059", "DCM", "Signal change")
RESULT_PURPOSE = Code("109103", "DCM", "Modifying Equipment")  # Contributing Equipment purpose

# UCUM units
MM = Code("mm", "UCUM", "millimeter")
MM2 = Code("mm2", "UCUM", "square millimeter")
MM3 = Code("mm3", "UCUM", "cubic millimeter")
NO_UNITS = Code("1", "UCUM", "no units")

# Finding types: the model's words, matched by keyword (first match wins).
FINDING_TYPES: tuple[tuple[str, Code], ...] = (
    ("effusion", Code("60046008", "SCT", "Pleural effusion")),
    ("pneumothorax", Code("36118008", "SCT", "Pneumothorax")),
    ("consolidation", Code("95436008", "SCT", "Lung consolidation")),
    ("atelectasis", Code("46621007", "SCT", "Atelectasis")),
    ("cardiomegaly", Code("8186001", "SCT", "Cardiomegaly")),
    ("edema", Code("19242006", "SCT", "Pulmonary edema")),
    ("oedema", Code("19242006", "SCT", "Pulmonary edema")),
    ("nodule", Code("27925004", "SCT", "Nodule")),
    ("mass", Code("4147007", "SCT", "Mass")),
)
IMAGING_FINDING = Code("365853002", "SCT", "Imaging finding")  # a measured change without a model label
DEVICE = Code("49062001", "SCT", "Device")

LUNG_ZONES = {
    "upper": Code("281392002", "SCT", "Upper zone of lung"),
    "middle": Code("281393007", "SCT", "Middle zone of lung"),
    "lower": Code("281394001", "SCT", "Lower zone of lung"),
}
LUNG = Code("39607008", "SCT", "Lung")
MEDIASTINUM = Code("72410000", "SCT", "Mediastinum")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")

# Procedure Reported, by (modality, body part); the fallback is plain "Imaging".
CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain chest X-ray")
CT_CHEST = Code("169069000", "SCT", "Computed tomography of chest")
IMAGING = Code("363679005", "SCT", "Imaging")

LANGUAGES = {
    "en": "English", "en-US": "English (United States)", "en-GB": "English (United Kingdom)",
    "de": "German", "de-DE": "German (Germany)", "fr": "French", "fr-FR": "French (France)",
    "nl": "Dutch", "es": "Spanish", "it": "Italian",
}


def language_code(tag: str) -> CodedConcept:
    return CodedConcept(value=tag, scheme_designator="RFC5646", meaning=LANGUAGES.get(tag, tag))


def finding_type(text: str) -> Code:
    key = text.lower()
    for word, code in FINDING_TYPES:
        if word in key:
            return code
    return IMAGING_FINDING


def finding_kind(text: str) -> str:
    """A stable short word for a finding (the SNOMED code when known), used in tracking UIDs."""
    code = finding_type(text)
    return code.value if code is not IMAGING_FINDING else re.sub(r"\W+", " ", text.lower()).strip()


def finding_site(zone: str) -> FindingSite | None:
    """The finding site of a zone name such as "right upper zone" or "cardiac/mediastinal"."""
    key = zone.lower()
    if "mediastin" in key or "cardiac" in key:
        return FindingSite(MEDIASTINUM)
    side = RIGHT if re.search(r"\bright\b", key) else LEFT if re.search(r"\bleft\b", key) else None
    for level, code in LUNG_ZONES.items():
        if re.search(rf"\b{level}\b", key):
            return FindingSite(code, laterality=side)
    if "lung" in key:
        return FindingSite(LUNG, laterality=side)
    return None


def procedure_code(modality: str, body_part: str) -> Code:
    chest = "CHEST" in body_part.upper() or "THORAX" in body_part.upper()
    if chest and modality in ("CR", "DX"):
        return CHEST_RADIOGRAPH
    if chest and modality == "CT":
        return CT_CHEST
    return IMAGING
