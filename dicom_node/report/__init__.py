"""Structured Report writing and delivery to the PACS.

Names load lazily: dicom_node.config imports .settings from this package, and processes that
never write a report (the gpu worker, the SCP) must not pay for highdicom.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "CHANGE_CODES": ".codes", "DEVICE_CODES": ".codes",
    "build_overlay_sc": ".overlay_sc",
    "Destination": ".settings", "ReportSettings": ".settings", "TlsFiles": ".settings",
    "DeliveryQueue": ".delivery", "DeliveryRow": ".delivery", "DeliverySummary": ".delivery", "report_deliveries": ".delivery",
    "ImageRef": ".sr", "ReportInput": ".sr", "StudyRef": ".sr", "build_sr": ".sr", "device_uid": ".sr",
    "sr_series_uid": ".sr", "sr_sop_instance_uid": ".sr", "tracking_uid": ".sr",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .codes import CHANGE_CODES, DEVICE_CODES
    from .delivery import DeliveryQueue, DeliveryRow, DeliverySummary, report_deliveries
    from .overlay_sc import build_overlay_sc
    from .settings import Destination, ReportSettings, TlsFiles
    from .sr import ImageRef, ReportInput, StudyRef, build_sr, device_uid, sr_series_uid, sr_sop_instance_uid, tracking_uid


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
