"""The index record read off raw elements equals what pydicom's full conversion gives.

`ingest.Header.text` reads single plain-ASCII values straight from the raw element for speed; these
datasets mix such values with ones it must leave to pydicom (a character set, several values,
escape sequences, padding) and compare the two readings, field by field.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node import ingest
from dicom_node.synthetic import ct_slice


def parsed(ds: Dataset) -> ingest.Header:
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
    header = parsed(CASES[name])
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyDescription", "Modality", "BodyPartExamined", "SeriesNumber",
                    "SeriesDescription", "InstanceNumber", "ViewPosition", "ImageLaterality", "Laterality",
                    "RequestedProcedurePriority"):
        assert header.text(keyword) == converted_text(header.dataset, keyword), keyword


def test_a_non_ascii_name_is_decoded_with_its_character_set():
    assert parsed(CASES["latin-1 name"]).text("PatientName") == "Müller^Jürgen"


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
    monkeypatch.setattr(ingest, "_scanned", lambda *args: None)  # the whole header, as pydicom reads it
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
        return ingest._parse_source(data)[0].dataset
    except ingest.Malformed as exc:
        return str(exc)


def test_most_of_pydicoms_test_files_take_the_direct_header_read():
    files = _pydicom_test_files()
    direct = [path for path in files if _direct(path)]
    assert len(direct) >= len(files) // 2, f"only {len(direct)} of {len(files)}"


# --- the scan for the indexed elements (header_scan.py) ----------------------------------------


def _index_view(data: bytes) -> dict | str:
    """What the ingest takes from an instance: each indexed text, urgency, pixel data, syntax;
    or the refusal."""
    try:
        header, has_pixels, size = ingest._parse_source(data)
    except ingest.Malformed as exc:
        return str(exc)
    view = {keyword: header.text(keyword) for keyword in ingest.INDEXED_KEYWORDS
            if keyword != "RequestAttributesSequence"}
    view.update(urgent=header.urgent(), has_pixels=has_pixels, size=size, syntax=header.transfer_syntax)
    return view


def _scan_and_full_parse(data: bytes, monkeypatch) -> tuple[dict | str, dict | str]:
    scanned = _index_view(data)
    with monkeypatch.context() as patch:
        patch.setattr(ingest, "_scanned", lambda *args: None)
        full = _index_view(data)
    return scanned, full


def _written(ds: Dataset, implicit: bool = False) -> bytes:
    buffer = BytesIO()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _requested(priority: str, undefined_lengths: bool) -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = "RP1"
    item.RequestedProcedurePriority = priority
    nested = Dataset()
    nested.CodeValue = "X"
    item.ReferencedStudySequence = [nested]
    ds = case(RequestAttributesSequence=[item])
    if undefined_lengths:
        ds["RequestAttributesSequence"].is_undefined_length = True
        item["ReferencedStudySequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
    return ds


SCAN_CASES = {
    **{name: _written(ds) for name, ds in CASES.items()},
    "implicit VR": _written(case(PatientName="Doe^John"), implicit=True),
    "STAT request, undefined lengths": _written(_requested("STAT", True)),
    "HIGH request, defined lengths": _written(_requested("HIGH", False)),
    "routine request": _written(_requested("ROUTINE", True)),
}


@pytest.mark.parametrize("name", SCAN_CASES)
def test_the_scan_gives_the_index_what_pydicoms_parse_gives(name, monkeypatch):
    data = SCAN_CASES[name]
    assert ingest._scanned(data) is not None  # these take the scan
    scanned, full = _scan_and_full_parse(data, monkeypatch)
    assert scanned == full


def test_the_scan_reads_an_urgent_request():
    header, _ = ingest._scanned(SCAN_CASES["STAT request, undefined lengths"])
    assert header.urgent()


@pytest.mark.parametrize("path", _pydicom_test_files(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_the_scan_gives_what_pydicoms_parse_gives_on_pydicoms_test_files(path, monkeypatch):
    """Other vendors' oddities included: the same record, or (where the scan gives up, or
    pydicom refuses) the same refusal."""
    scanned, full = _scan_and_full_parse(open(path, "rb").read(), monkeypatch)
    assert scanned == full


@pytest.mark.parametrize("cut", [1, 7, 100, 200])
def test_a_truncated_instance_is_left_to_pydicom(cut):
    data = SCAN_CASES["plain"]
    assert ingest._scanned(data[:-cut]) is None
    with pytest.raises(ingest.Malformed, match="truncated"):
        ingest._parse_source(data[:-cut])


def test_most_of_pydicoms_test_files_take_the_scan():
    files = _pydicom_test_files()
    scanned = [path for path in files if ingest._scanned(open(path, "rb").read()) is not None]
    assert len(scanned) >= len(files) // 2, f"only {len(scanned)} of {len(files)}"


def test_a_transfer_syntax_pydicom_would_tidy_is_left_to_pydicom(monkeypatch):
    """A Transfer Syntax UID with a leading space (same length): the scan steps aside, and the
    index gets the UID as pydicom reads it, stripped, as from the full parse."""
    data = SCAN_CASES["plain"]
    syntax = b"1.2.840.10008.1.2.1\0"
    assert data.count(syntax) == 1
    odd = data.replace(syntax, b" 1.2.840.10008.1.2.1")
    assert ingest._scanned(odd) is None
    scanned, full = _scan_and_full_parse(odd, monkeypatch)
    assert scanned == full and scanned["syntax"] == "1.2.840.10008.1.2.1"


# --- a file over HEADER_PREFIX: its first bytes scanned, its pixel data skipped by length -------


def _file_over_the_prefix(tmp_path: Path, header_padding: int = 0) -> Path:
    ds = ct_slice("1.2.3", "1.2.3.4", 1, rows=512, cols=512)
    if header_padding:  # a private value before the patient module: the scan must read past it
        ds.add_new(0x00090010, "LO", "PADDING")
        ds.add_new(0x00091010, "OB", bytes(header_padding))
    path = tmp_path / "ct.dcm"
    path.write_bytes(_written(ds))
    assert ingest.HEADER_PREFIX < path.stat().st_size <= ingest.SMALL_INSTANCE
    return path


def _reads(monkeypatch) -> list[int]:
    sizes: list[int] = []
    read_all = ingest._read_all
    monkeypatch.setattr(ingest, "_read_all", lambda fd, size: sizes.append(size) or read_all(fd, size))
    return sizes


def test_a_file_over_the_header_prefix_is_indexed_from_its_first_bytes(tmp_path, monkeypatch):
    path = _file_over_the_prefix(tmp_path)
    reads = _reads(monkeypatch)
    scanned, full = _scan_and_full_parse(path, monkeypatch)
    # The scan: the prefix alone. The full parse (the scan switched off): the prefix, then all of it.
    assert reads == [ingest.HEADER_PREFIX, ingest.HEADER_PREFIX, path.stat().st_size]
    assert scanned == full and scanned["has_pixels"] and scanned["size"] == path.stat().st_size


def test_a_header_longer_than_the_prefix_is_read_whole(tmp_path, monkeypatch):
    path = _file_over_the_prefix(tmp_path, header_padding=2 * ingest.HEADER_PREFIX)
    reads = _reads(monkeypatch)
    header, has_pixels, size = ingest._parse_source(path)
    assert reads == [ingest.HEADER_PREFIX, size]  # gave up at the end of the prefix, then all of it
    assert header.text("PatientID") == converted_text(header.dataset, "PatientID") != ""
    assert has_pixels


def test_pixel_data_cut_short_past_the_prefix_is_still_found_truncated(tmp_path):
    path = _file_over_the_prefix(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ingest.Malformed, match="truncated"):
        ingest._parse_source(path)


def _padded_ct(tmp_path: Path, padding: int, **values) -> Path:
    ds = ct_slice("1.2.3", "1.2.3.4", 1, rows=512, cols=512)
    ds.add_new(0x00090010, "LO", "PADDING")
    ds.add_new(0x00091010, "OB", bytes(padding))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = tmp_path / "ct.dcm"
    path.write_bytes(_written(ds))
    return path


def test_a_wanted_value_across_the_end_of_the_prefix_is_read_whole(tmp_path, monkeypatch):
    """The last element (no pixel data here) is the patient's name, begun in the first 64 KiB
    and ended after them: the walk would need no further header, but may not cut the value."""
    name = "DOE^JANE^" + "X" * 41  # 50 characters

    def written(padding: int) -> bytes:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5"
        ds.add_new(0x00090010, "LO", "PADDING")
        ds.add_new(0x00091010, "OB", bytes(padding))
        ds.PatientName = name
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        return _written(ds)

    start = written(1000).index(name.encode())
    path = tmp_path / "sc.dcm"
    path.write_bytes(written(1000 + ingest.HEADER_PREFIX - 20 - start))
    assert path.read_bytes().index(name.encode()) == ingest.HEADER_PREFIX - 20 and path.read_bytes().endswith(name.encode())
    reads = _reads(monkeypatch)
    header, has_pixels, size = ingest._parse_source(path)
    assert reads == [ingest.HEADER_PREFIX, size]  # the scan of the prefix gave up
    assert header.text("PatientName") == name and not has_pixels


def test_an_element_after_the_pixel_data_past_the_prefix_is_read_whole(tmp_path, monkeypatch):
    path = _padded_ct(tmp_path, 2, DataSetTrailingPadding=b"\0" * 16)
    reads = _reads(monkeypatch)
    scanned, full = _scan_and_full_parse(path, monkeypatch)
    assert reads[:2] == [ingest.HEADER_PREFIX, path.stat().st_size]  # the scan gave up on the prefix
    assert scanned == full and scanned["has_pixels"]
