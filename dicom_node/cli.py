"""The `dicom-node` command line."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import load_settings
from .logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="PACS-integrated DICOM inference node.")


@app.command()
def serve() -> None:
    """Run the DICOM SCP (C-ECHO, C-STORE) and the study assembler until SIGTERM/SIGINT."""
    from .scp import DicomNode

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    node = DicomNode(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node.start()
    stop.wait()
    node.stop()


@app.command()
def echo(
    host: str,
    port: int,
    called_ae: Annotated[str, typer.Option("--called-ae", "-c", help="AE title of the peer")] = "ANY-SCP",
    calling_ae: Annotated[Optional[str], typer.Option("--calling-ae", "-a", help="our AE title (default: settings)")] = None,
) -> None:
    """C-ECHO a peer."""
    from .scu import AssociationFailed, Peer
    from .scu import echo as do_echo

    settings = load_settings()
    try:
        status = do_echo(Peer(host, port, called_ae), calling_ae or settings.ae_title)
    except AssociationFailed as exc:
        typer.echo(f"echo failed: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"C-ECHO {called_ae}@{host}:{port}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def send(
    host: str,
    port: int,
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively)")],
    called_ae: Annotated[str, typer.Option("--called-ae", "-c")] = "ANY-SCP",
    calling_ae: Annotated[Optional[str], typer.Option("--calling-ae", "-a")] = None,
) -> None:
    """C-STORE files and folders to a peer; exits non-zero if any instance failed."""
    from .scu import AssociationFailed, Peer
    from .scu import send as do_send

    settings = load_settings()
    try:
        report = do_send(Peer(host, port, called_ae), paths, calling_ae or settings.ae_title)
    except AssociationFailed as exc:
        typer.echo(f"send failed: {exc}", err=True)
        raise typer.Exit(2)
    for path, reason in report.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    for path, reason in report.failed:
        typer.echo(f"FAILED {path}: {reason}", err=True)
    typer.echo(f"sent {report.sent} ({report.warnings} with warnings), failed {len(report.failed)}, skipped {len(report.skipped)}")
    raise typer.Exit(1 if report.failed else 0)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Counts from the index, pending outbox rows and the latest associations."""
    from .index import Index

    settings = load_settings()
    index = Index(settings.database_url)
    data = {
        "ae_title": settings.ae_title,
        "port": settings.port,
        "storage_dir": str(settings.storage_dir),
        "counts": index.counts(),
        "outbox_pending": [row.__dict__ for row in index.outbox_rows(pending_only=True)],
        "recent_associations": index.recent_associations(),
    }
    index.dispose()
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    typer.echo(f"node {settings.ae_title} port {settings.port}, store {settings.storage_dir}")
    for key, value in data["counts"].items():
        typer.echo(f"  {key:22} {value}")
    for row in data["recent_associations"]:
        typer.echo(
            f"  assoc #{row['id']} {row['calling_ae']}@{row['peer_host']} {row['result']}"
            f" received={row['instances_received']} failures={row['failures']} {row['reason']}"
        )


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
