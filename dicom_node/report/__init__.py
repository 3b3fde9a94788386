"""Structured Report writing and delivery to the PACS."""

from .codes import CHANGE_CODES, DEVICE_CODES
from .overlay_sc import build_overlay_sc
from .settings import Destination, ReportSettings, TlsFiles
from .delivery import DeliveryQueue, DeliveryRow, DeliverySummary, report_deliveries
from .sr import (
    ImageRef,
    ReportInput,
    StudyRef,
    build_sr,
    device_uid,
    sr_series_uid,
    sr_sop_instance_uid,
    tracking_uid,
)

__all__ = [
    "CHANGE_CODES", "DEVICE_CODES", "DeliveryQueue", "DeliveryRow", "DeliverySummary", "Destination", "ImageRef", "ReportInput", "ReportSettings", "StudyRef",
    "TlsFiles", "build_overlay_sc", "build_sr", "report_deliveries", "device_uid", "sr_series_uid", "sr_sop_instance_uid", "tracking_uid",
]
