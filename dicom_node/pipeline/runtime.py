"""What a worker process needs, built once per process (after the fork, never shared across it)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..config import Settings, load_settings
from ..identity import SOFTWARE_VERSION
from ..index import Index
from ..ingest import Ingestor
from ..storage import InstanceStore
from .jobs import JobStore


def model_version(settings: Settings) -> str:
    """Part of the job key and of the SR's identity: changes when the analysis could change."""
    from .vlm import vlm_enabled, vlm_model_name

    version = f"analysis-{SOFTWARE_VERSION}"
    return f"{version}+{vlm_model_name(settings)}-{settings.vlm_backend}" if vlm_enabled(settings) else version


@dataclass
class Runtime:
    settings: Settings
    index: Index
    ingestor: Ingestor
    jobs: JobStore

    @classmethod
    def build(cls, settings: Settings) -> "Runtime":
        from ..startup import prepare

        prepare(settings)  # UID root and pseudonym keys of this process
        store = InstanceStore(settings.storage_dir, settings.min_free_disk_mb * 2**20, settings.duplicate_policy)
        index = Index(settings.database_url)
        return cls(settings, index, Ingestor(store, index), JobStore(index))


@functools.cache
def runtime() -> Runtime:
    return Runtime.build(load_settings())
