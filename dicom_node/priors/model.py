"""Typed records of prior retrieval: what an archive said about a study, and what was decided."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ArchiveUnavailable(Exception):
    """Transient: the archive is down, refused the association or failed the request after retries.
    The pipeline retries the job later."""


class RetrieveRefused(Exception):
    """Permanent configuration problem (e.g. the archive does not know our AE as a move destination).
    Retrying will not help until someone changes the PACS or node configuration."""


class MalformedResponse(ValueError):
    """An archive's answer about one study or series lacks what matching needs."""


@dataclass(frozen=True)
class SeriesRecord:
    series_uid: str
    modality: str
    body_part: str = ""
    description: str = ""
    number: str = ""
    views: frozenset[str] = frozenset()
    lateralities: frozenset[str] = frozenset()
    manufacturer: str = ""
    plane: str = ""  # AXIAL | CORONAL | SAGITTAL | "" (cross-sectional series)
    instance_count: int | None = None


@dataclass(frozen=True)
class StudyRecord:
    """One study, as the archive (or the local index, for the current study) describes it."""

    study_uid: str
    patient_id: str
    issuer: str = ""
    birth_date: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    description: str = ""
    modalities: frozenset[str] = frozenset()
    archive: str = ""
    instance_count: int | None = None
    series: tuple[SeriesRecord, ...] | None = None  # None until the series-level query

    @property
    def when(self) -> tuple[str, str]:
        return (self.study_date, _time_key(self.study_time))


def _time_key(value: str) -> str:
    digits = value.split(".")[0].replace(":", "")
    return digits.ljust(6, "0")[:6] if digits else ""


@dataclass
class CandidateDecision:
    study_uid: str
    study_date: str
    modality: str
    description: str
    kept: bool
    rule: str  # the rule that kept or dropped it
    archive: str = ""
    accession_number: str = ""


@dataclass
class PriorStudy:
    study_uid: str
    study_date: str
    accession_number: str
    study_description: str
    modality: str
    body_part: str
    series_uids: list[str]  # the chosen image series (reports are in report_series_uids)
    instance_paths: list[Path]  # local files of the chosen image series, after retrieval
    report_text: str | None
    archive: str
    role: str = "recent"  # recent | baseline
    report_series_uids: list[str] = field(default_factory=list)
    report_paths: list[Path] = field(default_factory=list)
    reused_from_cache: bool = False
    missing_instances: int = 0  # instances the archive listed that did not arrive (partial retrieve)


@dataclass
class PriorRetrieval:
    study_uid: str
    chosen: list[PriorStudy] = field(default_factory=list)
    candidates: list[CandidateDecision] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)  # prior studies evicted from the cache by this run
    # True: the comparison proceeds in "no prior available" mode (a warning says why)
    no_prior: bool = True

    def update_no_prior(self) -> bool:
        self.no_prior = not any(prior.instance_paths for prior in self.chosen)
        return self.no_prior
