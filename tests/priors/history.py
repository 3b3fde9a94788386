"""A patient history for the archive: small DICOM instances with the attributes prior matching reads.

Images are 16x16 so seeding Orthanc over C-STORE takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node import identity


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    birth_date: str = "19500101"
    issuer: str = ""


@dataclass
class Study:
    patient: Patient
    date: str
    modality: str
    body_part: str
    description: str
    accession: str
    views: tuple[str, ...] = ("PA",)  # one series per view (projection radiography)
    laterality: str = ""
    images_per_series: int = 1
    report_text: str | None = None  # a radiologist's Basic Text SR in its own series
    node_result: bool = False  # add a result series written by the node itself
    time: str = "101500"
    uid: str = field(default_factory=generate_uid)
    series_uids: list[str] = field(default_factory=list)

    def datasets(self) -> list[Dataset]:
        out = []
        for number, view in enumerate(self.views, start=1):
            series_uid = generate_uid()
            self.series_uids.append(series_uid)
            for image in range(1, self.images_per_series + 1):
                out.append(image_instance(self, series_uid, number, image, view))
        if self.report_text is not None:
            series_uid = generate_uid()
            self.series_uids.append(series_uid)
            out.append(text_sr(self, series_uid, self.report_text))
        if self.node_result:
            series_uid = generate_uid()
            self.series_uids.append(series_uid)
            result = text_sr(self, series_uid, "AI comparison: stable.")
            result.Manufacturer = identity.MANUFACTURER
            result.SeriesDescription = identity.RESULT_SERIES_DESCRIPTION
            out.append(result)
        return out


def _base(study: Study, series_uid: str, sop_class: str, modality: str, series_number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    p = study.patient
    ds.PatientID = p.patient_id
    if p.issuer:
        ds.IssuerOfPatientID = p.issuer
    ds.PatientName = p.name
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyDescription = study.description
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.Modality = modality
    ds.Manufacturer = "ACME Imaging"
    return ds


def image_instance(study: Study, series_uid: str, series_number: int, number: int, view: str) -> Dataset:
    projection = study.modality in ("CR", "DX", "MG")
    sop_class = DigitalXRayImageStorageForPresentation if projection else CTImageStorage
    ds = _base(study, series_uid, sop_class, study.modality, series_number)
    ds.BodyPartExamined = study.body_part
    ds.SeriesDescription = f"{study.body_part} {view}".strip()
    ds.InstanceNumber = number
    if projection:
        ds.ViewPosition = view
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        if study.laterality:
            ds.ImageLaterality = study.laterality
            ds.Laterality = study.laterality
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(number)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.FrameOfReferenceUID = generate_uid()
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.random.default_rng(number).integers(0, 4096, (16, 16), dtype=np.uint16).tobytes()
    return ds


def _code(value: str, scheme: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return Sequence([item])


def text_sr(study: Study, series_uid: str, text: str) -> Dataset:
    """A Basic Text SR: a report container holding a Findings TEXT item and an Impression TEXT item."""
    ds = _base(study, series_uid, BasicTextSRStorage, "SR", 99)
    ds.SeriesDescription = "Radiology report"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = study.date, "120000"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = _code("18748-4", "LN", "Diagnostic imaging report")
    findings = Dataset()
    findings.RelationshipType, findings.ValueType = "CONTAINS", "TEXT"
    findings.ConceptNameCodeSequence = _code("121071", "DCM", "Finding")
    findings.TextValue = text
    impression = Dataset()
    impression.RelationshipType, impression.ValueType = "CONTAINS", "TEXT"
    impression.ConceptNameCodeSequence = _code("121073", "DCM", "Impression")
    impression.TextValue = "See findings."
    ds.ContentSequence = Sequence([findings, impression])
    return ds


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
