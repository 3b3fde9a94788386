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


def _pdf(text: str) -> bytes:
    """A one-page PDF with a text layer (built by hand: no PDF writer is a dependency)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _pdf_report(tmp_path, document: bytes):
    ds = _base(study(), generate_uid(), EncapsulatedPDFStorage, "DOC", 98)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = document
    ds.BurnedInAnnotation = "YES"
    [path] = write([ds], tmp_path)
    return path


def test_a_pdf_report_gives_its_text(tmp_path):
    text, problem = report_text(_pdf_report(tmp_path, _pdf("Impression: small left effusion.")))
    assert problem is None
    assert text == "Impression: small left effusion."


def test_a_broken_pdf_report_is_a_problem_not_a_guess(tmp_path):
    text, problem = report_text(_pdf_report(tmp_path, b"%PDF-1.4 fake"))
    assert text is None and "encapsulated PDF" in problem


def test_an_unreadable_report_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"not dicom at all")
    text, problem = report_text(path)
    assert text is None and "unreadable" in problem
