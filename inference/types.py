"""Typed boundary of the inference package.

The node hands arrays plus the few DICOM attributes analysis needs; inference
hands back typed findings. Nothing here knows about DICOM networking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Literal

import numpy as np

# The one change vocabulary (DESIGN.md); synonyms are mapped onto it at parse time.
ChangeStatus = Literal["new", "resolved", "improved", "worsened", "stable", "indeterminate"]
CHANGE_STATUSES: tuple[str, ...] = ("new", "resolved", "improved", "worsened", "stable", "indeterminate")
PRESENT = "present"  # against normal references (no prior): atypical for normals, no claim about time
DeviceStatus = Literal["placed", "removed", "repositioned", "unchanged"]
DEVICE_STATUSES: tuple[str, ...] = ("placed", "removed", "repositioned", "unchanged")


@dataclass(frozen=True)
class ImageInput:
    """One image (2D radiograph) or volume (z, y, x), in physical units."""

    pixels: np.ndarray  # float32, 2D (rows, cols) or 3D (slices, rows, cols)
    spacing_mm: tuple[float, ...]  # (row, col) or (slice, row, col)
    modality: str = ""
    body_part: str = ""
    view: str = ""  # PA / AP / LAT ...
    laterality: str = ""  # R / L / B / ""
    patient_orientation: tuple[str, ...] = ()
    acquired_on: date | None = None
    source: str = ""  # file name or SOP Instance UID, for error messages and evidence
    sop_instance_uid: str = ""
    # False when the file carried no pixel spacing and 1 mm was assumed (measurements are then in pixels).
    spacing_known: bool = True
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    slice_sources: tuple[str, ...] = ()  # volumes: the file (or SOP Instance UID) of each slice, in pixel order
    # Lossy compression in the image's history (LossyImageCompression 01 or a lossy transfer syntax):
    # its ratio, 0.0 when the ratio is not recorded; None: not lossy-compressed.
    lossy_ratio: float | None = None

    @property
    def is_volume(self) -> bool:
        return self.pixels.ndim == 3


TREND_STATUSES: tuple[str, ...] = ("new", "resolved", "worsened", "improved", "stable")


@dataclass(frozen=True)
class Timepoint:
    """The finding at one time point (one study), measured on that time point's own image."""

    date: date | None
    study_uid: str
    sop_instance_uid: str
    present: bool
    long_axis_mm: float | None = None  # None where absent
    short_axis_mm: float | None = None  # largest width perpendicular to the long axis
    area_mm2: float | None = None  # volumes: on the key slice
    volume_mm3: float | None = None
    # Outline on this time point's own image, in its own pixels (row, col); () where absent or unmapped.
    contour: tuple[tuple[int, int], ...] = ()
    source: str = ""  # file name or SOP Instance UID of the image measured


@dataclass(frozen=True)
class ChangeRegion:
    """A measured region of change, in current-image pixel coordinates."""

    zone: str  # e.g. "right upper zone", "cardiac/mediastinal"
    bbox: tuple[int, int, int, int]  # (row0, col0, row1, col1), end-exclusive
    area_mm2: float  # volume_mm3 for volumes is reported separately
    longest_diameter_mm: float
    mean_change: float  # mean intensity change (current - prior), normalised units
    status: str  # one of CHANGE_STATUSES
    confidence: float  # 0..1
    contour: tuple[tuple[int, int], ...] = ()  # (row, col) points
    volume_mm3: float | None = None
    # Volumes only: (slice0, row0, col0, slice1, row1, col1), end-exclusive; bbox/contour are on key_slice.
    bbox_3d: tuple[int, int, int, int, int, int] | None = None
    key_slice: int | None = None
    kind: str = ""  # "increase" (denser/brighter now) or "decrease"
    # The finding itself at every time point compared, oldest first, the current last (inference.lesions);
    # area_mm2 / longest_diameter_mm above describe the region of change, not the finding.
    timepoints: tuple[Timepoint, ...] = ()
    trend: str = ""  # over the whole trajectory: one of TREND_STATUSES ("" when not measured)
    lesion_type: str = ""  # what the analysis can honestly call it: focal opacity, basal opacity, diffuse change

    @property
    def current_timepoint(self) -> Timepoint | None:
        return self.timepoints[-1] if self.timepoints else None


@dataclass(frozen=True)
class SanityFlag:
    code: str  # e.g. "laterality_mismatch"
    reason: str
    blocking: bool  # True: the pair is refused for comparison


@dataclass(frozen=True)
class RegistrationQuality:
    ncc_before: float
    ncc_after: float
    succeeded: bool
    transform: str = ""


@dataclass(frozen=True)
class ReferenceUse:
    """One normal reference (another person) the query was compared against, and why it was chosen."""

    source: str  # the reference's library file or de-identified SOP Instance UID
    why: str  # e.g. "same DX CHEST PA; sex F matches; age 40-49 (query 40-49); descriptor 0.93"
    sop_instance_uid: str = ""  # de-identified UIDs: evidence in the SR
    sop_class_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    registered: bool = True  # False: registration onto the query failed; not part of the normal model
    ncc_after: float = 0.0


@dataclass
class ComparisonResult:
    regions: list[ChangeRegion] = field(default_factory=list)
    sanity_flags: list[SanityFlag] = field(default_factory=list)
    registration: RegistrationQuality | None = None
    refused: bool = False  # sanity gate refused the pair
    no_prior: bool = False
    overlay: np.ndarray | None = None  # RGB uint8 heat map on the current image
    summary: str = ""
    findings: list[str] = field(default_factory=list)  # one human-readable line per region
    current_source: str = ""
    prior_source: str = ""  # the prior actually compared (the most recent usable one)
    prior_date: date | None = None
    # Every prior measured against (oldest first; the last is prior_source): the time points of the regions.
    priors_compared: list[str] = field(default_factory=list)
    analysis_spacing_mm: tuple[float, ...] = ()  # grid the change map was computed on
    seconds: float = 0.0
    # "prior": against the patient's own prior; "reference": against normal references of other people
    # (no change over time is claimed; region status is "present").
    mode: str = "prior"
    references: list[ReferenceUse] = field(default_factory=list)
