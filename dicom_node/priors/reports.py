"""Text of a prior study's report object, as context for the comparison."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from .. import identity

MAX_DEPTH = 32  # SR trees are shallow; a deeper one is malformed or cyclic by reference


def _meaning(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence") or []
    return str(names[0].get("CodeMeaning", "")).strip() if names else ""


def _value(item: Dataset) -> str:
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return str(item.get("TextValue", "")).strip()
    if kind == "CODE":
        codes = item.get("ConceptCodeSequence") or []
        return str(codes[0].get("CodeMeaning", "")).strip() if codes else ""
    if kind == "NUM":
        values = item.get("MeasuredValueSequence") or []
        if not values:
            return ""
        units = values[0].get("MeasurementUnitsCodeSequence") or []
        unit = str(units[0].get("CodeValue", "")) if units else ""
        return f"{values[0].get('NumericValue', '')} {unit}".strip()
    if kind in ("DATE", "TIME", "DATETIME", "PNAME", "UIDREF"):
        keyword = {"DATE": "Date", "TIME": "Time", "DATETIME": "DateTime", "PNAME": "PersonName", "UIDREF": "UID"}[kind]
        return str(item.get(keyword, "")).strip()
    return ""


def sr_text(ds: Dataset) -> str:
    """Walk ContentSequence depth-first: one "Concept: value" line per item that carries a value."""
    lines: list[str] = []

    def walk(items, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        for item in items or []:
            value = _value(item)
            if value:
                name = _meaning(item)
                lines.append(f"{name}: {value}" if name else value)
            elif str(item.get("ValueType", "")) == "CONTAINER" and _meaning(item):
                lines.append(f"{_meaning(item)}:")
            walk(item.get("ContentSequence"), depth + 1)

    walk(ds.get("ContentSequence"), 0)
    return "\n".join(line for line in lines if line.strip())


def _pdf_text(document: bytes, path: Path) -> tuple[str | None, str | None]:
    """Text of an encapsulated PDF report (a scanned PDF has none: said, not guessed)."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        pages = PdfReader(BytesIO(document.rstrip(b"\x00"))).pages  # DICOM pads odd lengths with a NUL
        text = "\n".join((page.extract_text() or "").strip() for page in pages).strip()
    except (PdfReadError, ValueError, KeyError, OSError) as exc:
        return None, f"report {path.name}: encapsulated PDF unreadable: {exc}"
    return (text or None), (None if text else f"report {path.name}: encapsulated PDF has no text layer (scanned?)")


def report_text(path: Path) -> tuple[str | None, str | None]:
    """(text, problem): the text of an SR file; a problem when it is not a readable text report."""
    try:
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - a broken prior report must not stop the comparison
        return None, f"report {path.name} unreadable: {exc}"
    if str(ds.get("Manufacturer", "")) == identity.MANUFACTURER:
        return None, None  # our own result: never context
    modality = str(ds.get("Modality", ""))
    if modality == "SR" or "ContentSequence" in ds:
        text = sr_text(ds)
        return (text or None), (None if text else f"report {path.name} has no text content items")
    if "EncapsulatedDocument" in ds:
        mime = str(ds.get("MIMETypeOfEncapsulatedDocument", "unknown type"))
        document = bytes(ds.EncapsulatedDocument)
        if mime.startswith("text/"):
            return document.decode("utf-8", "replace").strip("\x00 \n") or None, None
        if mime == "application/pdf":
            return _pdf_text(document, path)
        return None, f"report {path.name} is an encapsulated {mime}: text not extracted"
    return None, f"report {path.name} ({modality}) holds no text"
