"""References to DICOM instances and studies, as the reports cite them (no DICOM library needed)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageRef:
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str


@dataclass
class StudyRef:
    study_uid: str
    study_date: str = ""  # DICOM DA (YYYYMMDD)
    accession_number: str = ""
    study_description: str = ""
    instances: list[ImageRef] = field(default_factory=list)
