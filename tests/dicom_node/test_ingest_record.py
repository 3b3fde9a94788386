"""The index record read off raw elements equals what pydicom's full conversion gives.

`ingest._text` reads single plain-ASCII values straight from the raw element for speed; these
datasets mix such values with ones it must leave to pydicom (a character set, several values,
escape sequences, padding) and compare the two readings, field by field.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_node import ingest
from dicom_node.synthetic import ct_slice


def parsed(ds: Dataset) -> Dataset:
    """`ds` written as a file and read back the way the ingest reads it (raw elements)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    header, _, _ = ingest._parse_source(buffer.getvalue())
    return header


def converted_text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def case(**values) -> Dataset:
    ds = ct_slice("1.2.3", "1.2.3.4", 1, rows=8, cols=8)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


CASES = {
    "plain": case(PatientName="Doe^Jane", PatientID="P-001", AccessionNumber="A1", SeriesNumber="0007"),
    "latin-1 name": case(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen", StudyDescription="Thorax pâ"),
    "utf-8": case(SpecificCharacterSet="ISO_IR 192", PatientName="Ωmega^Ζeta", InstitutionName="Hôpital"),
    "japanese iso 2022": case(SpecificCharacterSet=["", "ISO 2022 IR 87"],
                              PatientName="Yamada^Tarou=\033$B;3ED\033(B^\033$BB@O:\033(B"),
    "several values": case(BodyPartExamined="CHEST", ViewPosition="PA", PatientID="ID1\\ID2"),
    "padded and empty": case(StudyDescription="", SeriesDescription="x ", Laterality="L"),
}


@pytest.mark.parametrize("name", CASES)
def test_record_fields_match_pydicoms_conversion(name):
    ds = parsed(CASES[name])
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyDescription", "Modality", "BodyPartExamined", "SeriesNumber",
                    "SeriesDescription", "InstanceNumber", "ViewPosition", "ImageLaterality", "Laterality",
                    "RequestedProcedurePriority"):
        assert ingest._text(ds, keyword) == converted_text(ds, keyword), keyword


def test_a_non_ascii_name_is_decoded_with_its_character_set():
    ds = parsed(CASES["latin-1 name"])
    assert ingest._text(ds, "PatientName") == "Müller^Jürgen"


def _pydicom_test_files() -> list[str]:
    """The files pydicom ships (get_testdata_files would also look for downloadable ones)."""
    import pydicom.data

    return sorted(str(path) for path in (Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def _direct(path: str) -> bool:
    with open(path, "rb") as f:
        return ingest._plain_header(f.read(ingest.META_PEEK)) is not None


@pytest.mark.parametrize("path", [p for p in _pydicom_test_files() if _direct(p)], ids=lambda p: p.rsplit("/", 1)[-1])
def test_the_direct_header_read_gives_what_dcmread_gives(path, monkeypatch):
    """Over pydicom's own test files (other vendors' oddities included): the ingest's parse
    with the direct header read (`_plain_header`) and with dcmread reading the header give the
    same dataset, element for element, or the same refusal."""
    data = open(path, "rb").read()
    ours = _outcome(data)
    monkeypatch.setattr(ingest, "_plain_header", lambda head: None)
    expected = _outcome(data)
    if isinstance(expected, str):
        assert ours == expected
        return
    assert not isinstance(ours, str), ours
    assert str(ours.file_meta.TransferSyntaxUID) == str(expected.file_meta.TransferSyntaxUID)
    assert ours.original_encoding == expected.original_encoding
    assert [e.tag for e in ours.elements()] == [e.tag for e in expected.elements()]
    for element in expected.elements():
        if getattr(element, "length", 0) != 0xFFFFFFFF and getattr(element, "length", 0) > ingest.DEFER_SIZE:
            continue  # deferred: read by neither
        assert ours[element.tag].value == expected[element.tag].value, element.tag


def _outcome(data: bytes) -> Dataset | str:
    try:
        return ingest._parse_source(data)[0]
    except ingest.Malformed as exc:
        return str(exc)


def test_most_of_pydicoms_test_files_take_the_direct_header_read():
    files = _pydicom_test_files()
    direct = [path for path in files if _direct(path)]
    assert len(direct) >= len(files) // 2, f"only {len(direct)} of {len(files)}"
