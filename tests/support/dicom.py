"""Reading back what the node stored."""

from __future__ import annotations

from pathlib import Path

from pynetdicom.dsutils import split_dataset


def dataset_bytes(path: Path) -> bytes:
    """The dataset as encoded, without the file meta (which each receiver writes itself)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def incoming_files(storage_dir: Path) -> list[Path]:
    """What is in the store's .incoming besides the owner files of live processes (incoming_owner.py)."""
    return [p for p in (Path(storage_dir) / ".incoming").iterdir() if not p.name.endswith(".owner")]


def stored_files(storage_dir: Path) -> list[Path]:
    """Instances in the store, leaving out .incoming and .conflicts."""
    return [p for p in storage_dir.rglob("*.dcm") if not p.relative_to(storage_dir).parts[0].startswith(".")]
