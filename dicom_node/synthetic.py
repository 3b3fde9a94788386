"""Small synthetic DICOM instances for tests, the ingest benchmark and the quickstart.

(Realistic chest phantoms with ground truth live in inference.phantoms; these are
plain CT slices whose content does not matter, only their size and attributes.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_slice(
    study_uid: str,
    series_uid: str,
    number: int,
    rows: int = 64,
    cols: int = 64,
    patient_id: str = "SYN0001",
    patient_name: str = "SYNTHETIC^PATIENT",
    study_date: str = "20260101",
    accession: str = "ACC0001",
    seed: int | None = None,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = "CT CHEST"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 62 else generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    rng = np.random.default_rng(number if seed is None else seed)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    return ds


def write_ct_study(folder: Path, count: int, rows: int = 64, cols: int = 64, **attrs) -> tuple[str, list[Path]]:
    """Write `count` slices of one new study/series under `folder`; returns (study UID, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds = ct_slice(study_uid, series_uid, number, rows, cols, **attrs)
        path = folder / f"ct_{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def iter_ct_datasets(count: int, **attrs) -> Iterator[Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    for number in range(1, count + 1):
        yield ct_slice(study_uid, series_uid, number, **attrs)
