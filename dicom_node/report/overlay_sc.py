"""Optional Secondary Capture: the current image with the change overlay and a burned-in legend,
in the current study, for viewers that do not render SR."""

from __future__ import annotations

import textwrap

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from .. import identity
from .settings import ReportSettings
from .sr import ReportInput, overlay_series_uid, overlay_sop_instance_uid

LEGEND_LINE_PX = 12
LEGEND_CHAR_PX = 6  # PIL's default bitmap font


def legend_lines(inp: ReportInput) -> list[str]:
    prior = inp.comparison.prior_date.isoformat() if inp.comparison.prior_date else "unknown date"
    return [
        "AI CHANGE OVERLAY - UNVERIFIED",
        "red: denser now, blue: less dense now, yellow box: measured region",
        f"prior of {prior}, model {inp.model_name} {inp.model_version}",
    ]


def _with_legend(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    rows, cols, _ = rgb.shape
    lines = [wrapped for line in lines for wrapped in textwrap.wrap(line, max(8, cols // LEGEND_CHAR_PX))]
    band = LEGEND_LINE_PX * len(lines) + 4
    canvas = Image.new("RGB", (cols, rows + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((2, rows + 2 + i * LEGEND_LINE_PX), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_overlay_sc(inp: ReportInput, settings: ReportSettings) -> Dataset | None:
    """The overlay as a Secondary Capture, or None when disabled or when the comparison produced none
    (no prior, refused pair, failed registration)."""
    overlay = inp.comparison.overlay
    if not settings.overlay_sc_enabled or overlay is None or inp.comparison.refused:
        return None
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
        raise ValueError(f"ComparisonResult.overlay must be RGB uint8 (rows, cols, 3), not {overlay.dtype} {overlay.shape}")
    pixels = _with_legend(np.ascontiguousarray(overlay), legend_lines(inp))
    ref = inp.current_dataset
    spacing = inp.comparison.analysis_spacing_mm
    orientation = ref.get("PatientOrientation")
    sc = SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=overlay_series_uid(inp.current.study_uid, inp.model_name),
        series_number=settings.series_number + 1,
        sop_instance_uid=overlay_sop_instance_uid(inp.input_key),
        instance_number=inp.instance_number,
        manufacturer=identity.MANUFACTURER,
        pixel_spacing=tuple(float(s) for s in spacing[-2:]) if len(spacing) >= 2 else None,
        patient_orientation=tuple(orientation) if orientation is not None and len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=identity.OVERLAY_SERIES_DESCRIPTION,
        manufacturer_model_name=identity.MANUFACTURER_MODEL_NAME,
        software_versions=identity.SOFTWARE_VERSION,
        institution_name=settings.institution_name or ref.get("InstitutionName") or None,
    )
    sc.BurnedInAnnotation = "YES"
    laterality = str(ref.get("ImageLaterality", ref.get("Laterality", "")))
    sc.Laterality = laterality if laterality in ("R", "L") else ""  # type 2C: empty when unpaired/unknown
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = f"Change overlay by {inp.model_name} {inp.model_version}"[:1024]
    source = Dataset()
    source.ReferencedSOPClassUID = ref.SOPClassUID
    source.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc
