"""The reference library on disk: de-identified normal instances and their index.

Layout: <library>/instances/<SOPInstanceUID>.dcm (the de-identified UID) and <library>/index.json,
one record per instance with what selection needs (modality, body part, view, laterality, sex,
age band, image descriptor). Both are written atomically (temporary file, fsync, rename) under
an exclusive lock, so an interrupted import leaves the library as it was.

Import rules (a reference must be normal, and must not identify anyone):
- the operator attests that the studies are normal (`--normal`): nothing in a DICOM header
  proves the absence of a finding, so a person who read them says so; the attestation (who,
  when) is kept in the index;
- an instance whose own metadata contradicts that is refused, naming the attribute: burned-in
  annotation (BurnedInAnnotation YES), a derived or secondary image (ImageType), or a finding
  named in a description or comment (see FINDING_WORDS);
- de-identification follows the DICOM PS3.15 Annex E Basic Application Level Confidentiality
  Profile as tabulated by the dicom-anonymizer library (table of the 2026c standard: identifiers
  removed or emptied, UIDs replaced, dates blanked, private tags removed), with the Retain
  Patient Characteristics Option for Patient's Sex only; the age band is kept in the index,
  computed before de-identification. PatientIdentityRemoved and the De-identification Method
  Code Sequence (DCM 113100, 113108) say so in each file;
- a duplicate (the same pixel data, by SHA-256) is reported and skipped, whatever its UIDs.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..storage import write_atomic

INDEX_FILE = "index.json"
INSTANCES_DIR = "instances"
INDEX_VERSION = 1
ANONYMIZATION_TABLE = "dicomfields_2026c"
# Words that, in a description or comment, say the image shows a finding (case-insensitive, whole words).
FINDING_WORDS = ("nodule", "mass", "tumou?r", "lesion", "effusion", "consolidation", "pneumonia", "pneumothorax",
                 "fracture", "opacity", "opacities", "infiltrate", "atelectasis", "edema", "oedema", "cardiomegaly",
                 "metastas[ie]s", "abnormal", "carcinoma", "cancer")
_FINDING_RE = re.compile(r"\b(" + "|".join(FINDING_WORDS) + r")\b", re.IGNORECASE)
_TEXT_ATTRIBUTES = ("StudyDescription", "SeriesDescription", "ImageComments", "RequestedProcedureDescription",
                    "AdmittingDiagnosesDescription", "ReasonForStudy", "PerformedProcedureStepDescription")
REFERENCE_SERIES_DESCRIPTION = "NORMAL REFERENCE (de-identified)"


class ReferenceRefused(ValueError):
    """An instance that cannot become a reference; the message names the file and the attribute."""


@dataclass(frozen=True)
class ReferenceRecord:
    sop_instance_uid: str  # de-identified UIDs (the file's own)
    sop_class_uid: str
    series_uid: str
    study_uid: str
    file: str  # relative to the library folder
    modality: str
    body_part: str
    view: str
    laterality: str
    sex: str  # M / F / O / ""
    age_band: str  # "40-49" / ""
    descriptor_kind: str
    descriptor: list[float] = field(repr=False)
    pixel_sha256: str = ""
    attestation: str = ""  # who attested the study normal, and when
    added_at: float = 0.0
    encoder_kind: str = ""  # the vision encoder's embedding (encoder.py), when a local model was configured
    encoder_descriptor: list[float] = field(default_factory=list, repr=False)


@dataclass
class AddReport:
    added: list[ReferenceRecord] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, the reference it duplicates)


class Library:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # --- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.root / INDEX_FILE).is_file()

    def records(self) -> list[ReferenceRecord]:
        path = self.root / INDEX_FILE
        if not path.is_file():
            return []
        data = json.loads(path.read_text())
        if data.get("version") != INDEX_VERSION:
            raise ValueError(f"{path}: reference index version {data.get('version')!r}, expected {INDEX_VERSION}")
        return [ReferenceRecord(**r) for r in data["references"]]

    def path_of(self, record: ReferenceRecord) -> Path:
        return self.root / record.file

    # --- changing --------------------------------------------------------------------------

    def add(self, paths: list[Path], *, attested_normal: bool, deidentify: bool = True,
            attested_by: str | None = None, encoder=None) -> AddReport:
        """Import DICOM files (folders are searched recursively) as normal references; `encoder`
        (encoder.encoder_for) adds the vision encoder's descriptor to the thumbnail."""
        if not attested_normal:
            raise ReferenceRefused(
                "references must be attested normal: pass --normal once a radiologist has confirmed that these "
                "studies show no finding (the attestation is recorded in the library index)")
        report = AddReport()
        who = attested_by or _user()
        with self._locked():
            records = self.records()
            by_hash = {r.pixel_sha256: r for r in records}
            for path in _files(paths):
                try:
                    record, ds = self._prepare(path, who, deidentify, encoder)
                except ReferenceRefused as exc:
                    report.refused.append((str(path), str(exc)))
                    continue
                if record.pixel_sha256 in by_hash:
                    report.duplicates.append((str(path), by_hash[record.pixel_sha256].sop_instance_uid))
                    continue
                _write_dataset(self.root / record.file, ds)
                records.append(record)
                by_hash[record.pixel_sha256] = record
                report.added.append(record)
            if report.added:
                self._write_index(records)
        return report

    def remove(self, sop_instance_uid: str) -> ReferenceRecord:
        with self._locked():
            records = self.records()
            match = [r for r in records if r.sop_instance_uid == sop_instance_uid]
            if not match:
                raise KeyError(f"no reference with SOP Instance UID {sop_instance_uid} in {self.root}")
            self._write_index([r for r in records if r.sop_instance_uid != sop_instance_uid])
            with contextlib.suppress(FileNotFoundError):
                self.path_of(match[0]).unlink()
            return match[0]

    # --- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_index(self, records: list[ReferenceRecord]) -> None:
        data = {"version": INDEX_VERSION, "references": [asdict(r) for r in records]}
        write_atomic(self.root / INDEX_FILE, json.dumps(data, indent=1).encode())

    def _prepare(self, path: Path, who: str, deidentify: bool, encoder=None) -> tuple[ReferenceRecord, Dataset]:
        from inference.errors import InputError
        from inference.pixels import image_from_dataset
        from inference.references import DESCRIPTOR_KIND, descriptor

        from ..priors.rules import normalise_laterality, normalise_view

        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise ReferenceRefused(f"{path}: not a readable DICOM file ({exc})") from None
        if "PixelData" not in ds:
            raise ReferenceRefused(f"{path}: no PixelData: not an image")
        _check_normal_by_metadata(path, ds)
        try:
            image = image_from_dataset(ds, str(path))
            desc = descriptor(image)
            embedding = encoder(image) if encoder is not None else ()
        except InputError as exc:
            raise ReferenceRefused(f"{path}: cannot be analysed: {exc}") from None
        pixel_hash = hashlib.sha256(ds.PixelData).hexdigest()
        sex = str(ds.get("PatientSex", "") or "").upper()
        age_band = _age_band(ds)
        if deidentify:
            _deidentify(ds)
        ds.SeriesDescription = REFERENCE_SERIES_DESCRIPTION
        uid = str(ds.SOPInstanceUID)
        record = ReferenceRecord(
            sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID), series_uid=str(ds.get("SeriesInstanceUID", "")),
            study_uid=str(ds.get("StudyInstanceUID", "")), file=f"{INSTANCES_DIR}/{uid}.dcm",
            modality=str(ds.get("Modality", "")).upper(), body_part=str(ds.get("BodyPartExamined", "")).upper(),
            view=normalise_view(str(ds.get("ViewPosition", "") or "")),
            laterality=normalise_laterality(str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "")),
            sex=sex if sex in ("M", "F", "O") else "", age_band=age_band, descriptor_kind=DESCRIPTOR_KIND,
            descriptor=[round(float(v), 5) for v in desc], pixel_sha256=pixel_hash,
            attestation=f"attested normal by {who} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
            added_at=time.time(), encoder_kind=encoder.kind if encoder is not None else "",
            encoder_descriptor=[round(float(v), 5) for v in embedding])
        return record, ds


def _check_normal_by_metadata(path: Path, ds: Dataset) -> None:
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise ReferenceRefused(f"{path}: BurnedInAnnotation is YES (annotations in the pixels): not a clean normal image")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if image_type[:1] == ["DERIVED"] or "SECONDARY" in image_type[1:2]:
        shown = "\\".join(image_type)
        raise ReferenceRefused(f"{path}: ImageType {shown}: a derived or secondary image, not an acquisition")
    for name in _TEXT_ATTRIBUTES:
        text = str(ds.get(name, "") or "")
        hit = _FINDING_RE.search(text)
        if hit:
            raise ReferenceRefused(f"{path}: {name} names a finding ({hit.group(0)!r}): not a normal study")


def _deidentify(ds: Dataset) -> None:
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions
    from pydicom.sequence import Sequence

    keep = {(0x0010, 0x0040): lambda dataset, tag: None}  # Retain Patient Characteristics Option: sex
    anonymize_dataset(ds, keep, delete_private_tags=True, base_rules_gen=lambda: initialize_actions(ANONYMIZATION_TABLE))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 E.1 Basic Profile; Retain Patient Characteristics (sex)"  # LO: 64 chars
    codes = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"),
                           ("113108", "Retain Patient Characteristics Option")):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)


def _age_band(ds: Dataset) -> str:
    """Decade of age at the study ("40-49"), from PatientAge or the birth and study dates."""
    years = None
    age = str(ds.get("PatientAge", "") or "")
    m = re.fullmatch(r"(\d{3})([DWMY])", age)
    if m:
        n = int(m.group(1))
        years = {"D": n / 365.25, "W": n / 52.18, "M": n / 12, "Y": n}[m.group(2)]
    else:
        birth, study = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
        if re.fullmatch(r"\d{8}", birth) and re.fullmatch(r"\d{8}", study) and birth < study:
            years = int(study[:4]) - int(birth[:4]) - ((study[4:] < birth[4:]) and 1 or 0)
    if years is None:
        return ""
    lo = int(years // 10) * 10
    return f"{lo}-{lo + 9}"


def _files(paths: list[Path]):
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        else:
            yield p


def _write_dataset(path: Path, ds: Dataset) -> None:
    buffer = io.BytesIO()  # one de-identified image, already read whole by the import
    ds.save_as(buffer, enforce_file_format=True)
    write_atomic(path, buffer.getvalue())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"
