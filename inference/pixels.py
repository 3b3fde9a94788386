"""DICOM pixels to float arrays in physical units, with spacing and the few attributes analysis needs.

Modality LUT (rescale) always; a VOI LUT *sequence* when present (it is the
manufacturer's intended non-linear processing); a linear window is not applied
because it only rescales (normalisation removes that) and its clipping would
hide change. MONOCHROME1 is inverted so that higher always means denser.
Sizes are checked from the header before decoding, so a huge image is refused
without allocating it.
"""

from __future__ import annotations

import math
import os
from datetime import date
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .errors import InputError
from .types import ImageInput

MIN_SIDE = 32  # smaller cannot hold anatomy worth comparing
MAX_SIDE = 16384
MAX_PIXELS_2D = 8192 * 8192  # 256 MiB as float32; keeps a pair's analysis well under 2 GB
MAX_VOXELS = 512 * 512 * 1024
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"}
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
}


def load_path(path: str | os.PathLike) -> ImageInput:
    """One DICOM file, or a folder (see `load_folder`)."""
    p = Path(path)
    if p.is_dir():
        return load_folder(p)
    return load_image(p)


def load_image(path: str | os.PathLike) -> ImageInput:
    """Read one DICOM file into an ImageInput (a volume for multi-frame CT/MR)."""
    source = str(path)
    try:
        ds = pydicom.dcmread(source)
    except FileNotFoundError:
        raise InputError(source, "file", "does not exist") from None
    except Exception as exc:  # pydicom raises several types for non-DICOM input
        raise InputError(source, "file", f"not readable as DICOM ({exc})") from None
    return image_from_dataset(ds, source)


def load_folder(folder: str | os.PathLike) -> ImageInput:
    """Pick the image to analyse from a folder: the largest CT/MR series as a volume,
    otherwise the largest single image (ties: first by file name)."""
    folder = Path(folder)
    headers: list[tuple[Path, Dataset]] = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue  # not DICOM: folders often hold DICOMDIR, readme files, etc.
        if "Rows" in ds and "Columns" in ds:
            headers.append((f, ds))
    if not headers:
        raise InputError(str(folder), "PixelData", "no DICOM image found in folder")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    volumes = [
        s for s in series.values()
        if len(s) >= 3 and str(s[0][1].get("Modality", "")) in VOLUME_MODALITIES
        and all("ImagePositionPatient" in d for _, d in s)
    ]
    if volumes:
        best = max(volumes, key=len)
        return load_series([f for f, _ in best])
    f, _ = max(headers, key=lambda h: int(h[1].Rows) * int(h[1].Columns))
    return load_image(f)


def load_series(paths: Iterable[str | os.PathLike]) -> ImageInput:
    datasets = []
    for p in paths:
        try:
            datasets.append((str(p), pydicom.dcmread(str(p))))
        except Exception as exc:
            raise InputError(str(p), "file", f"not readable as DICOM ({exc})") from None
    return volume_from_datasets([d for _, d in datasets], [s for s, _ in datasets])


def volume_from_datasets(datasets: list[Dataset], sources: list[str] | None = None) -> ImageInput:
    """Single-frame slices of one series into a (z, y, x) volume sorted along the slice normal."""
    if not datasets:
        raise InputError("", "PixelData", "empty series")
    sources = sources or [str(d.get("SOPInstanceUID", "")) for d in datasets]
    first = datasets[0]
    iop = _floats(first, "ImageOrientationPatient", sources[0], 6)
    normal = np.cross(iop[:3], iop[3:])
    keyed = []
    for ds, src in zip(datasets, sources):
        pos = _floats(ds, "ImagePositionPatient", src, 3)
        keyed.append((float(np.dot(pos, normal)), ds, src))
    keyed.sort(key=lambda k: k[0])
    rows, cols = int(first.Rows), int(first.Columns)
    _check_size(sources[0], rows, cols, len(keyed))
    slices = []
    for _, ds, src in keyed:
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise InputError(src, "Rows/Columns", f"{ds.Rows}x{ds.Columns} differs from the series' {rows}x{cols}")
        slices.append(_decode(ds, src)[0] if _n_frames(ds) > 1 else _decode(ds, src))
    vol = np.stack(slices).astype(np.float32)
    positions = np.array([k[0] for k in keyed])
    if len(positions) > 1:
        dz = float(np.median(np.diff(positions)))
    else:
        dz = float(first.get("SliceThickness", 0) or 0)
    if not dz > 0:
        raise InputError(sources[0], "ImagePositionPatient", "slices are not separated along the normal")
    row_mm, col_mm, known = _spacing(first, sources[0])
    base = _attributes(first)
    return ImageInput(pixels=vol, spacing_mm=(dz, row_mm, col_mm), spacing_known=known,
                      source=sources[0] if len(sources) == 1 else f"{sources[0]} (+{len(sources) - 1} slices)",
                      slice_sources=tuple(src for _, _, src in keyed), **base)


def image_from_dataset(ds: Dataset, source: str = "") -> ImageInput:
    """One dataset (file already read) into an ImageInput."""
    source = source or str(ds.get("SOPInstanceUID", ""))
    arr = _decode(ds, source)
    row_mm, col_mm, known = _spacing(ds, source)
    modality = str(ds.get("Modality", "")).upper()
    if arr.ndim == 3:
        if modality in VOLUME_MODALITIES:
            dz = _frame_spacing(ds, source)
            return ImageInput(pixels=arr, spacing_mm=(dz, row_mm, col_mm), spacing_known=known,
                              source=source, **_attributes(ds))
        arr = arr[0]  # multi-frame projection image: the first frame is the image
    return ImageInput(pixels=arr, spacing_mm=(row_mm, col_mm), spacing_known=known, source=source,
                      **_attributes(ds))


def _n_frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _check_size(source: str, rows: int, cols: int, frames: int) -> None:
    if rows < MIN_SIDE or cols < MIN_SIDE:
        raise InputError(source, "Rows/Columns", f"{rows}x{cols} is below the minimum {MIN_SIDE}x{MIN_SIDE}")
    if rows > MAX_SIDE or cols > MAX_SIDE:
        raise InputError(source, "Rows/Columns", f"{rows}x{cols} exceeds the limit of {MAX_SIDE} per side")
    if frames == 1 and rows * cols > MAX_PIXELS_2D:
        raise InputError(source, "Rows/Columns", f"{rows}x{cols} exceeds the limit of {MAX_PIXELS_2D} pixels")
    if rows * cols * frames > MAX_VOXELS:
        raise InputError(source, "NumberOfFrames",
                         f"{frames}x{rows}x{cols} exceeds the limit of {MAX_VOXELS} voxels")


def _decode(ds: Dataset, source: str) -> np.ndarray:
    """Pixel data to float32 in physical units; 2D or (frames, rows, cols)."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(source, "PixelData", "missing (no pixel data in the dataset)")
    for attr in ("Rows", "Columns"):
        if attr not in ds or ds[attr].value in (None, ""):
            raise InputError(source, attr, "missing")
    rows, cols, frames = int(ds.Rows), int(ds.Columns), _n_frames(ds)
    _check_size(source, rows, cols, frames)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in _GREY | _COLOUR:
        raise InputError(source, "PhotometricInterpretation",
                         f"{photometric or 'missing'} is not supported (MONOCHROME1/2, RGB, YBR only)")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if "PixelData" in ds:
        tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2.1"))
        if tsyntax in _NATIVE_SYNTAXES:
            bits = int(ds.get("BitsAllocated", 16) or 16)
            expected = rows * cols * frames * spp * bits // 8
            got = len(ds.PixelData)
            if got < expected:
                raise InputError(source, "PixelData",
                                 f"{got} bytes but Rows x Columns x frames x samples needs {expected}")
    try:
        raw = ds.pixel_array
    except Exception as exc:
        raise InputError(source, "PixelData", f"cannot be decoded ({exc})") from None
    arr = np.asarray(raw)
    if spp == 3:
        # Colour: pydicom returns RGB (YBR converted); analysis uses luminance.
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    elif "PixelData" in ds:
        arr = _apply_luts(ds, arr, photometric)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        attr = "FloatPixelData" if "FloatPixelData" in ds else "PixelData"
        raise InputError(source, attr, "contains NaN or infinite values")
    return arr


def _apply_luts(ds: Dataset, arr: np.ndarray, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = apply_modality_lut(arr, ds).astype(np.float32, copy=False)
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(out, ds, prefer_lut=True).astype(np.float32, copy=False)
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16) or 16)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = intercept, intercept + slope * (2**bits - 1)
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            lo, hi = intercept - slope * 2 ** (bits - 1), intercept + slope * (2 ** (bits - 1) - 1)
        out = (lo + hi) - out
    return out


def _spacing(ds: Dataset, source: str) -> tuple[float, float, bool]:
    value, attr = None, "PixelSpacing"
    for name in ("PixelSpacing", "ImagerPixelSpacing"):
        if name in ds and ds[name].value not in (None, ""):
            value, attr = ds[name].value, name
            break
    if value is None:
        try:
            value = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            attr = "PixelSpacing (shared functional groups)"
        except (AttributeError, IndexError, KeyError):
            return 1.0, 1.0, False  # e.g. secondary capture: measurements will be in pixels
    try:
        row_mm, col_mm = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(source, attr, f"{value!r} is not two numbers") from None
    if row_mm == 0 and col_mm == 0:
        return 1.0, 1.0, False  # 0\0 is how some vendors write "not calibrated": sizes will be in pixels
    if not (math.isfinite(row_mm) and math.isfinite(col_mm)) or row_mm <= 0 or col_mm <= 0:
        raise InputError(source, attr, f"{row_mm}\\{col_mm} must be positive and finite")
    return row_mm, col_mm, True


def _frame_spacing(ds: Dataset, source: str) -> float:
    for path in (("SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "SpacingBetweenSlices"),
                 ("SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "SliceThickness")):
        try:
            v = float(ds[path[0]][0][path[1]][0][path[2]].value)
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if v > 0:
            return v
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        v = ds.get(name)
        if v not in (None, "") and float(v) > 0:
            return float(v)
    raise InputError(source, "SpacingBetweenSlices", "multi-frame volume without a positive slice spacing")


def _floats(ds: Dataset, attr: str, source: str, n: int) -> np.ndarray:
    try:
        v = np.array([float(x) for x in ds[attr].value], dtype=float)
    except (KeyError, TypeError, ValueError):
        raise InputError(source, attr, "missing or not numeric") from None
    if v.shape != (n,) or not np.isfinite(v).all():
        raise InputError(source, attr, f"expected {n} finite numbers")
    return v


def _dicom_date(ds: Dataset) -> date | None:
    for name in ("AcquisitionDate", "ContentDate", "SeriesDate", "StudyDate"):
        v = str(ds.get(name, "") or "")
        if len(v) >= 8 and v[:8].isdigit():
            try:
                return date(int(v[:4]), int(v[4:6]), int(v[6:8]))
            except ValueError:
                continue
    return None


# Transfer syntaxes that are lossy by definition: JPEG baseline/extended, JPEG-LS near-lossless,
# MPEG-2/4 and HEVC video. (JPEG 2000 and HTJ2K may be lossless: there the header's flag decides.)
_LOSSY_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                   *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109))}


def _lossy_ratio(ds: Dataset) -> float | None:
    """The compression ratio when the pixels went through lossy compression (0.0: ratio not recorded)."""
    from pydicom.multival import MultiValue

    flagged = str(ds.get("LossyImageCompression", "") or "").strip() == "01"
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if not flagged and syntax not in _LOSSY_SYNTAXES:
        return None
    raw = ds.get("LossyImageCompressionRatio", None)
    try:
        values = [float(v) for v in (raw if isinstance(raw, (list, MultiValue)) else [raw]) if v not in (None, "")]
    except (TypeError, ValueError):
        values = []
    return float(np.prod(values)) if values else 0.0  # successive compressions multiply


def _attributes(ds: Dataset) -> dict:
    orientation = ds.get("PatientOrientation", None)
    if orientation is None or orientation == "":
        orientation_t: tuple[str, ...] = ()
    elif isinstance(orientation, str):
        orientation_t = tuple(orientation.split("\\"))
    else:
        orientation_t = tuple(str(o) for o in orientation)
    laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").upper()
    return dict(
        modality=str(ds.get("Modality", "") or "").upper(),
        body_part=str(ds.get("BodyPartExamined", "") or "").upper(),
        view=str(ds.get("ViewPosition", "") or "").upper(),
        laterality=laterality,
        patient_orientation=orientation_t,
        acquired_on=_dicom_date(ds),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        lossy_ratio=_lossy_ratio(ds),
    )


def validate_image(img: ImageInput) -> None:
    """The checks `load_image` makes, for arrays handed in directly (compare() calls this)."""
    source = img.source
    a = img.pixels
    if not isinstance(a, np.ndarray) or a.ndim not in (2, 3):
        raise InputError(source, "pixels", f"expected a 2D image or 3D volume, got {getattr(a, 'shape', a)!r}")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(source, "pixels", f"dtype {a.dtype} is not a real number type")
    rows, cols = a.shape[-2:]
    frames = a.shape[0] if a.ndim == 3 else 1
    _check_size(source, rows, cols, frames)
    if a.ndim == 3 and frames < 2:
        raise InputError(source, "NumberOfFrames", "a volume needs at least 2 slices")
    if len(img.spacing_mm) != a.ndim:
        raise InputError(source, "PixelSpacing", f"{len(img.spacing_mm)} values for a {a.ndim}D image")
    if not all(math.isfinite(s) and s > 0 for s in img.spacing_mm):
        raise InputError(source, "PixelSpacing", f"{img.spacing_mm} must be positive and finite")
    if not np.isfinite(a).all():
        raise InputError(source, "PixelData", "contains NaN or infinite values")
