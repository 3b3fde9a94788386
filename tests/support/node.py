"""An in-process DicomNode on a loopback port of its own, for integration tests."""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import Settings

from .procs import free_port

NODE_AE = "DICOM_NODE"


def node_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(
        host="127.0.0.1",
        port=free_port(),
        storage_dir=tmp_path / "store",
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        min_free_disk_mb=1,
        study_idle_seconds=0.5,
        assembly_poll_seconds=0.1,
        http_port=free_port(),
    )
    values.update(overrides)
    return Settings(**values)
