"""Settings of prior retrieval (nested under Settings.priors; env DICOM_NODE_PRIORS__...).

Archives are a list, e.g. DICOM_NODE_PRIORS__ARCHIVES='[{"name": "pacs", "ae_title": "PACS",
"host": "10.0.0.5", "port": 104, "method": "c-move"}]' or the `priors.archives` list in the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator


class ArchiveConfig(BaseModel):
    """One archive (PACS/VNA) to query for priors; archives are queried in the order listed."""

    name: str  # label used in logs, warnings and `dicom-node priors` output
    method: Literal["c-move", "c-get", "dicomweb"] = "c-move"  # how images are retrieved (c-move/c-get query with C-FIND, dicomweb with QIDO-RS)
    ae_title: str = ""  # the archive's AE title (c-move, c-get)
    host: str = ""  # the archive's DICOM host name or address (c-move, c-get)
    port: int = 104  # the archive's DICOM port (c-move, c-get)
    calling_ae_title: str = ""  # our AE title towards this archive; empty: the node's ae_title
    move_destination: str = ""  # AE title the archive sends C-MOVE results to; empty: the node's ae_title
    dicomweb_url: str = ""  # DICOMweb root for method dicomweb, e.g. https://pacs/dicom-web
    tls_enabled: bool = False  # DICOM TLS to the archive (c-move, c-get)
    tls_ca: Path | None = None  # CA bundle that signed the archive's certificate (DICOM TLS and https DICOMweb)
    tls_cert: Path | None = None  # our client certificate, when the archive requires one
    tls_key: Path | None = None  # key of tls_cert
    tls_check_hostname: bool = True  # the archive's certificate must name the host dialled (`host`, or dicomweb_url's host)
    timeout_seconds: float = 30.0  # connect, association and C-FIND/QIDO response timeout
    retrieve_timeout_seconds: float = 300.0  # longest wait for the next C-MOVE/C-GET response or WADO-RS part
    required: bool = True  # unreachable: True fails the attempt (the job is retried later), False records a warning and goes on

    @model_validator(mode="after")
    def _complete(self) -> ArchiveConfig:
        if self.method == "dicomweb" and not self.dicomweb_url:
            raise ValueError(f"archive {self.name!r}: method dicomweb needs dicomweb_url")
        if self.method != "dicomweb" and not (self.ae_title and self.host):
            raise ValueError(f"archive {self.name!r}: method {self.method} needs ae_title and host")
        return self


def _default_body_part_regions() -> dict[str, str]:
    return {
        "THORAX": "CHEST", "LUNG": "CHEST", "RIBS": "CHEST", "CHEST_TO_PELVIS": "CHEST",
        "ABDOMENPELVIS": "ABDOMEN", "PELVIS": "ABDOMEN", "KIDNEY": "ABDOMEN", "LIVER": "ABDOMEN",
        "SKULL": "HEAD", "BRAIN": "HEAD",
        "CSPINE": "SPINE", "TSPINE": "SPINE", "LSPINE": "SPINE",
    }


class PriorSettings(BaseModel):
    enabled: bool = True  # look for priors at all; False: every comparison runs in "no prior available" mode
    archives: list[ArchiveConfig] = Field(default_factory=list)  # archives to query, in order
    lookback_years: float = 5.0  # only priors at most this old (relative to the current study date)
    max_priors: int = 1  # keep the N most recent matching priors
    include_baseline: bool = False  # also keep the oldest matching prior in the lookback window
    match_modality: bool = True  # a prior must share a modality (or modality group) with the current study
    modality_groups: list[list[str]] = Field(default_factory=lambda: [["CR", "DX"]])  # modalities treated as the same
    match_body_part: bool = True  # a prior must image the same anatomic region (when both sides record one)
    body_part_regions: dict[str, str] = Field(default_factory=_default_body_part_regions)  # BodyPartExamined -> region it counts as
    match_view: bool = True  # projection radiography: the prior must have the current view (PA/AP/LAT...)
    match_laterality: bool = True  # the prior must have the current laterality (when both sides record one)
    projection_modalities: list[str] = Field(default_factory=lambda: ["CR", "DX", "MG", "RG"])  # where view matching applies
    accept_missing_issuer: bool = False  # accept priors without IssuerOfPatientID when the current study has one
    max_candidates: int = 100  # at most this many studies (newest first) get a series-level query
    retrieve_reports: bool = True  # also retrieve report objects (SR, encapsulated documents) of a chosen prior
    lease_seconds: float = 3600.0  # a retrieved prior is protected from eviction this long (the comparison must finish in it)
    cache_budget_mb: float = 20480.0  # disk budget of retrieved priors; least recently used ones are evicted above it
    node_address: str = ""  # "host:port" the archive uses to reach this node, quoted in C-MOVE errors; empty: host/port settings

    @field_validator("modality_groups")
    @classmethod
    def _upper_groups(cls, value: list[list[str]]) -> list[list[str]]:
        return [[m.upper() for m in group] for group in value]

    @field_validator("body_part_regions")
    @classmethod
    def _upper_regions(cls, value: dict[str, str]) -> dict[str, str]:
        return {k.upper(): v.upper() for k, v in value.items()}

    @field_validator("projection_modalities")
    @classmethod
    def _upper_modalities(cls, value: list[str]) -> list[str]:
        return [m.upper() for m in value]

    @field_validator("max_priors", "max_candidates")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value
