"""Settings of SR writing and delivery (nested under Settings.report; env DICOM_NODE_REPORT__...)."""

from __future__ import annotations

from pydantic import BaseModel


class ReportSettings(BaseModel):
    pass
