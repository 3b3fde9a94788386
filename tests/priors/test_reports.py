"""Prior report text: Basic Text SR walked through ContentSequence; our own results never count."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EncapsulatedPDFStorage, generate_uid

from dicom_node import identity
from dicom_node.priors.reports import report_text, sr_text

from .conftest import JANE
from .history import Study, _base, _code, text_sr, write


def study() -> Study:
    return Study(JANE, "20231115", "DX", "CHEST", "XR CHEST", "ACC1")


def test_text_sr_gives_one_line_per_content_item(tmp_path):
    [path] = write([text_sr(study(), generate_uid(), "Small left pleural effusion.")], tmp_path)
    text, problem = report_text(path)
    assert problem is None
    assert text == "Finding: Small left pleural effusion.\nImpression: See findings."


def test_nested_containers_codes_and_numbers_are_read_in_order():
    ds = text_sr(study(), generate_uid(), "Nodule right upper lobe.")
    section = Dataset()
    section.RelationshipType, section.ValueType = "CONTAINS", "CONTAINER"
    section.ConceptNameCodeSequence = _code("121070", "DCM", "Findings")
    size = Dataset()
    size.RelationshipType, size.ValueType = "CONTAINS", "NUM"
    size.ConceptNameCodeSequence = _code("410668003", "SCT", "Length")
    measured = Dataset()
    measured.NumericValue = "8"
    measured.MeasurementUnitsCodeSequence = _code("mm", "UCUM", "millimeter")
    size.MeasuredValueSequence = Sequence([measured])
    status = Dataset()
    status.RelationshipType, status.ValueType = "CONTAINS", "CODE"
    status.ConceptNameCodeSequence = _code("33999-4", "LN", "Status")
    status.ConceptCodeSequence = _code("35105006", "SCT", "Increased")
    section.ContentSequence = Sequence([size, status])
    ds.ContentSequence.append(section)
    assert sr_text(ds).splitlines()[-3:] == ["Findings:", "Length: 8 mm", "Status: Increased"]


def test_the_nodes_own_report_is_not_context(tmp_path):
    ours = text_sr(study(), generate_uid(), "AI comparison: stable.")
    ours.Manufacturer = identity.MANUFACTURER
    [path] = write([ours], tmp_path)
    assert report_text(path) == (None, None)


def test_a_pdf_report_is_kept_but_its_text_is_not_guessed(tmp_path):
    ds = _base(study(), generate_uid(), EncapsulatedPDFStorage, "DOC", 98)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 fake"
    ds.BurnedInAnnotation = "YES"
    [path] = write([ds], tmp_path)
    text, problem = report_text(path)
    assert text is None and "encapsulated application/pdf: text not extracted" in problem


def test_an_unreadable_report_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"not dicom at all")
    text, problem = report_text(path)
    assert text is None and "unreadable" in problem
