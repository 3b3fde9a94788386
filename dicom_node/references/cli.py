"""`dicom-node references add|list|remove` and the offline `dicom-node compare CURRENT --references DIR`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .library import Library, ReferenceRefused

app = typer.Typer(no_args_is_help=True, help="The normal reference library (studies of other, healthy people).")


def _library(library: Optional[Path]) -> Library:
    from ..config import load_settings

    return Library(library or load_settings().references.library_dir)


LibraryOption = Annotated[Optional[Path], typer.Option(help="library folder (default: setting references.library_dir)")]


@app.command("add")
def add(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively)")],
    normal: Annotated[bool, typer.Option("--normal", help="attest that a radiologist read these studies as normal")] = False,
    keep_identifiers: Annotated[bool, typer.Option(
        "--keep-identifiers", help="do not de-identify (only for sources already de-identified elsewhere)")] = False,
    library: LibraryOption = None,
) -> None:
    """Import normal studies into the library, de-identified (DICOM basic confidentiality profile).

    Exit status: 0 all imported or already there, 1 some refused, 2 nothing could be imported at all."""
    from ..config import load_settings
    from .encoder import encoder_for

    lib = _library(library)
    try:
        report = lib.add(paths, attested_normal=normal, deidentify=not keep_identifiers,
                         encoder=encoder_for(load_settings()))
    except ReferenceRefused as exc:
        typer.echo(f"references add refused: {exc}", err=True)
        raise typer.Exit(2)
    for record in report.added:
        typer.echo(f"added {record.sop_instance_uid} {record.modality} {record.body_part} {record.view} "
                   f"sex {record.sex or '?'} age {record.age_band or '?'}")
    for path, uid in report.duplicates:
        typer.echo(f"duplicate {path}: already in the library as {uid}")
    for path, reason in report.refused:
        typer.echo(f"REFUSED {reason}", err=True)
    typer.echo(f"added {len(report.added)}, duplicates {len(report.duplicates)}, refused {len(report.refused)} "
               f"(library {lib.root}: {len(lib.records())} references)")
    raise typer.Exit(1 if report.refused else 0)


@app.command("list")
def list_references(library: LibraryOption = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the library's references (de-identified UIDs and the keys selection uses)."""
    lib = _library(library)
    records = lib.records()
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in r.__dict__.items() if k not in ("descriptor", "encoder_descriptor")} for r in records], indent=2))
        return
    if not records:
        typer.echo(f"the reference library {lib.root} is empty")
        return
    for r in records:
        typer.echo(f"{r.sop_instance_uid}  {r.modality:3} {r.body_part:6} {r.view:4} {r.laterality or '-':2} "
                   f"sex {r.sex or '?'} age {r.age_band or '?':6} {r.attestation}")


@app.command("remove")
def remove(uid: str, library: LibraryOption = None) -> None:
    """Remove one reference (by its de-identified SOP Instance UID) and its file."""
    try:
        record = _library(library).remove(uid)
    except KeyError as exc:
        typer.echo(str(exc.args[0]), err=True)
        raise typer.Exit(2)
    typer.echo(f"removed {record.sop_instance_uid}")


def compare_against_library(current: Path, library_dir: Path, count: int | None = None):
    """Offline comparison of one image against a library folder. Returns (ComparisonResult, reason):
    reason says why no reference was used (single-image mode), else ""."""
    from pydicom import dcmread

    from inference.pixels import load_path
    from inference.references import compare_with_references
    from inference.types import ComparisonResult

    from .. import audit
    from ..config import load_settings
    from ..index import Index
    from .encoder import encoder_for
    from .select import query_for, select_references
    from .use import load_references

    settings = load_settings()
    lib = Library(library_dir)
    if not lib.exists():
        raise ReferenceRefused(f"{library_dir} is not a reference library (no index.json): "
                               "create one with dicom-node references add --library DIR --normal FILES")
    image = load_path(current)
    first = Path(image.slice_sources[0]) if image.slice_sources else Path(image.source)
    header = dcmread(first, stop_before_pixels=True) if first.is_file() else {}
    keys = {k: str(header.get(k, "") or "") for k in ("PatientSex", "PatientAge", "PatientBirthDate", "StudyDate")}
    selection = select_references(lib.records(), query_for(image, keys, encoder_for(settings)),
                                  count or settings.references.count)
    if not selection.chosen:
        result = ComparisonResult(current_source=image.source, mode="reference", no_prior=True,
                                  summary=f"No normal reference used: {selection.reason}; the image was read alone.")
        return result, selection.reason
    images, uses = load_references(lib, selection)
    result = compare_with_references(image, images, uses)
    index = Index(settings.database_url)
    for choice in selection.chosen:
        audit.record_access(index, audit.REFERENCE_USED, str(header.get("StudyInstanceUID", "")),
                            detail=f"reference {choice.record.sop_instance_uid}: {choice.why}",
                            patient_id=str(header.get("PatientID", "")))
    return result, ""


def print_reference_result(result, as_json: bool) -> None:
    from inference.serialize import result_to_dict

    if as_json:
        typer.echo(json.dumps(result_to_dict(result), indent=2, default=str))
        return
    typer.echo(result.summary)
    for use in result.references:
        typer.echo(f"  reference {use.sop_instance_uid or use.source}: {use.why}"
                   f"{'' if use.registered else ' (not registered: left out)'}")
    for flag in result.sanity_flags:
        typer.echo(f"  sanity: {flag.code}{' (refused)' if flag.blocking else ''}: {flag.reason}")
    for line in result.findings:
        typer.echo(f"  - {line}")
