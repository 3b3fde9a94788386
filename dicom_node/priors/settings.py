"""Settings of prior retrieval (nested under Settings.priors; env DICOM_NODE_PRIORS__...)."""

from __future__ import annotations

from pydantic import BaseModel


class PriorSettings(BaseModel):
    pass
