"""The normal reference library: import (de-identified, attested normal), duplicates, removal, selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.references import Library, ReferenceRefused, query_for, select_references
from inference.pixels import image_from_dataset
from inference.reference_phantoms import make_normal_library, make_query

SIZE = 192


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _identified(ds: Dataset) -> Dataset:
    """A normal with every kind of identifier the basic profile must remove."""
    ds.InstitutionName = "Saint Elsewhere Hospital"
    ds.ReferringPhysicianName = "Kildare^James"
    ds.OperatorsName = "Operator^Olga"
    ds.OtherPatientIDs = "OTHERID77"
    ds.PatientAddress = "12 Acacia Avenue"
    ds.StudyID = "STUDY-4711"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    ds.ReferencedStudySequence = Sequence([ref])
    block = ds.private_block(0x0009, "ACME HOSPITAL", create=True)
    block.add_new(0x01, "LO", str(ds.PatientName))
    return ds


def test_import_deidentifies_files_and_index(tmp_path):
    ds = _identified(make_normal_library(1, SIZE)[0])
    originals = [str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber), str(ds.StudyInstanceUID),
                 str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientBirthDate), str(ds.StudyDate),
                 "Saint Elsewhere", "Kildare", "Operator^Olga", "OTHERID77", "Acacia", "STUDY-4711", "Person0"]
    lib = Library(tmp_path / "lib")
    report = lib.add([_write(ds, tmp_path / "in" / "a.dcm")], attested_normal=True, attested_by="dr test")
    assert len(report.added) == 1 and not report.refused
    stored = (tmp_path / "lib" / report.added[0].file).read_bytes()
    index = (tmp_path / "lib" / "index.json").read_bytes()
    for value in originals:
        assert value.encode() not in stored, value
        assert value.encode() not in index, value
    out = dcmread(tmp_path / "lib" / report.added[0].file)
    assert out.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113108"]
    assert out.PatientSex == "M"  # Retain Patient Characteristics Option
    assert out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID == report.added[0].sop_instance_uid
    assert out.ViewPosition == "PA" and out.BodyPartExamined == "CHEST"
    rec = lib.records()[0]
    assert (rec.modality, rec.body_part, rec.view, rec.sex, rec.age_band) == ("DX", "CHEST", "PA", "M", "80-89")
    assert "attested normal by dr test" in rec.attestation and len(rec.descriptor) == 32 * 32


def test_refused_without_attestation_and_nothing_written(tmp_path):
    path = _write(make_normal_library(1, SIZE)[0], tmp_path / "a.dcm")
    lib = Library(tmp_path / "lib")
    with pytest.raises(ReferenceRefused, match="--normal"):
        lib.add([path], attested_normal=False)
    assert lib.records() == [] and not (tmp_path / "lib" / "instances").exists()


def test_not_normal_by_metadata_is_refused_others_imported(tmp_path):
    normals = make_normal_library(4, SIZE)
    normals[1].StudyDescription = "XR CHEST follow-up of right upper lobe nodule"
    normals[2].BurnedInAnnotation = "YES"
    normals[3].ImageType = ["DERIVED", "SECONDARY"]
    paths = [_write(ds, tmp_path / "in" / f"{i}.dcm") for i, ds in enumerate(normals)]
    report = Library(tmp_path / "lib").add(paths, attested_normal=True)
    assert len(report.added) == 1
    reasons = dict(report.refused)
    assert "StudyDescription names a finding ('nodule')" in reasons[str(paths[1])]
    assert "BurnedInAnnotation" in reasons[str(paths[2])]
    assert "ImageType DERIVED" in reasons[str(paths[3])]


def test_duplicate_import_is_reported_not_stored_twice(tmp_path):
    ds = make_normal_library(1, SIZE)[0]
    a = _write(ds, tmp_path / "a.dcm")
    lib = Library(tmp_path / "lib")
    first = lib.add([a], attested_normal=True)
    ds.SOPInstanceUID = "1.2.3.4.5"  # another UID, same pixels: still the same image
    again = lib.add([a, _write(ds, tmp_path / "b.dcm")], attested_normal=True)
    assert again.added == [] and [uid for _, uid in again.duplicates] == [first.added[0].sop_instance_uid] * 2
    assert len(lib.records()) == 1 and len(list((tmp_path / "lib" / "instances").iterdir())) == 1


def test_remove(tmp_path):
    lib = Library(tmp_path / "lib")
    report = lib.add([_write(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(make_normal_library(2, SIZE))],
                     attested_normal=True)
    gone = lib.remove(report.added[0].sop_instance_uid)
    assert not lib.path_of(gone).exists()
    assert [r.sop_instance_uid for r in lib.records()] == [report.added[1].sop_instance_uid]
    with pytest.raises(KeyError, match="no reference"):
        lib.remove(gone.sop_instance_uid)


def _query(ds):
    return query_for(image_from_dataset(ds), {k: str(ds.get(k, "")) for k in ("PatientSex", "PatientBirthDate", "StudyDate")})


def test_selection_rules_and_explanations(tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add([_write(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(make_normal_library(6, SIZE))], attested_normal=True)
    q = make_query(0, 14.0, SIZE).dataset
    empty = select_references([], _query(q), 3)
    assert empty.chosen == [] and empty.reason == "the reference library is empty"

    sel = select_references(lib.records(), _query(q), 3)
    assert [c.rank for c in sel.chosen] == [1, 2, 3]
    assert [c.distance for c in sel.chosen] == sorted(c.distance for c in sel.chosen)
    top = sel.chosen[0]
    assert top.why.startswith("same DX CHEST PA; sex ") and "thumbnail similarity" in top.why and "rank 1 of 6" in top.why
    every = select_references(lib.records(), _query(q), 10).chosen
    assert len(every) == 6 and every[:3] == sel.chosen  # the count cuts the same ranking
    for c in every:  # the query is M: a woman pays the sex term on top of her descriptor distance
        expected = (1 - c.similarity) + (0.10 if c.record.sex == "F" else 0.0)
        assert c.distance == pytest.approx(expected + 0.05 * abs(int(c.record.age_band[:2]) - 80) / 10, abs=2e-4)

    lat = make_query(1, None, SIZE).dataset
    lat.ViewPosition = "LL"
    none = select_references(lib.records(), _query(lat), 3)
    assert none.chosen == [] and none.reason == "no DX CHEST reference of view LAT (the library has PA)"


def test_index_is_json_without_identifiers_of_the_query(tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add([_write(make_normal_library(1, SIZE)[0], tmp_path / "a.dcm")], attested_normal=True)
    data = json.loads((tmp_path / "lib" / "index.json").read_text())
    assert data["version"] == 1 and set(data["references"][0]) >= {"sop_instance_uid", "view", "age_band", "descriptor"}
