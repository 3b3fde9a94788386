"""Prior study retrieval (query, selection rules, retrieve, cache).

The Celery pipeline calls `retrieve_priors`; `dicom-node priors STUDY_UID` prints `explain_priors`.
Names are loaded lazily: dicom_node.config imports .settings from this package, and the rest of
the package imports dicom_node.config.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "ArchiveConfig": ".settings",
    "PriorSettings": ".settings",
    "ArchiveUnavailable": ".model",
    "CandidateDecision": ".model",
    "PriorRetrieval": ".model",
    "PriorStudy": ".model",
    "RetrieveRefused": ".model",
    "explain_priors": ".retrieve",
    "release_priors": ".retrieve",
    "retrieve_priors": ".retrieve",
    "select_priors": ".retrieve",
}
__all__ = [
    "ArchiveConfig",
    "ArchiveUnavailable",
    "CandidateDecision",
    "PriorRetrieval",
    "PriorSettings",
    "PriorStudy",
    "RetrieveRefused",
    "explain_priors",
    "release_priors",
    "retrieve_priors",
    "select_priors",
]

if TYPE_CHECKING:  # pragma: no cover
    from .model import (
        ArchiveUnavailable,
        CandidateDecision,
        PriorRetrieval,
        PriorStudy,
        RetrieveRefused,
    )
    from .retrieve import explain_priors, release_priors, retrieve_priors, select_priors
    from .settings import ArchiveConfig, PriorSettings


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
