"""Settings of SR writing and delivery (nested under Settings.report; env DICOM_NODE_REPORT__...).

Destinations are a list, so from the environment they are given as JSON, e.g.
DICOM_NODE_REPORT__DESTINATIONS='[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}]'
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..validators import check_ae_title


class TlsFiles(BaseModel):
    """TLS for one destination (DICOM TLS for C-STORE, https for STOW-RS)."""

    ca: Path | None = None  # CA bundle that signed the destination's certificate; None: system trust store
    cert: Path | None = None  # this node's client certificate (PEM), when the destination wants mutual TLS
    key: Path | None = None  # the client certificate's private key (PEM)
    check_hostname: bool = True  # the certificate must name the host dialled (`host`, or the stow_url's host)


class Destination(BaseModel):
    """One place every report goes to; each is delivered (and retried) independently."""

    name: str  # short unique label, shown in the outbox and the logs (e.g. "pacs", "research")
    kind: Literal["c-store", "stow-rs"] = "c-store"  # DIMSE C-STORE or DICOMweb STOW-RS
    ae_title: str = "ANY-SCP"  # c-store: the destination's (called) AE title
    host: str = "127.0.0.1"  # c-store: host name or address of the destination
    port: int = 104  # c-store: DICOM port of the destination
    tls: TlsFiles | None = None  # c-store: DICOM TLS when set; stow-rs: CA/client certificate for https
    stow_url: str = ""  # stow-rs: DICOMweb root, e.g. https://pacs/dicom-web (".../studies" is appended)
    storage_commitment: bool = False  # c-store: request Storage Commitment (N-ACTION) after a successful store
    timeout_seconds: float = 30.0  # connect, association, DIMSE/HTTP response timeout for this destination

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @model_validator(mode="after")
    def _kind_needs(self) -> "Destination":
        if self.kind == "stow-rs" and not self.stow_url:
            raise ValueError(f"destination {self.name!r}: kind stow-rs needs stow_url")
        if self.kind == "stow-rs" and self.storage_commitment:
            raise ValueError(f"destination {self.name!r}: storage commitment exists for c-store only")
        return self


class ReportSettings(BaseModel):
    destinations: list[Destination] = Field(default_factory=list)  # where reports go; empty: written to the outbox folder only
    backoff_base_seconds: float = 10.0  # first retry after ~this long; doubles with every failed attempt
    backoff_max_seconds: float = 900.0  # retries are never further apart than this (they go on until accepted)
    backoff_jitter: float = 0.25  # +/- this fraction of random spread on each delay, so retries don't synchronise
    overlay_sc_enabled: bool = False  # also write a Secondary Capture of the change overlay, for viewers without SR
    language: str = "en-US"  # RFC 5646 language of the report text (Language of Content Item and Descendants)
    institution_name: str = ""  # Institution Name written into the SR / SC; empty: copied from the current image
    series_number: int = 9901  # Series Number of the SR series (the SC overlay series uses series_number + 1)
    commitment_timeout_seconds: float = 600.0  # no Storage Commitment result this long after the store: send again
    max_polygon_points: int = 64  # a region's outline in the SR is simplified to at most this many points

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {duplicates}")
        return value
