"""What every node process does with its settings before it works: derived UIDs under the
site's root, pseudonym keys loaded (a bad key file stops the process here, clearly), and the
configuration mistakes worth a warning logged once."""

from __future__ import annotations

import gc
import logging

from . import identity, pseudonyms
from .config import Settings, unknown_env_variables
from .logs import log_event

log = logging.getLogger(__name__)


def prepare(settings: Settings) -> None:
    identity.set_uid_root(settings.uid_root)
    pseudonyms.configure(settings.pseudonym_key_file, settings.storage_dir)


def warn_about_configuration(settings: Settings, environ: dict[str, str] | None = None) -> None:
    """Logged at the start of `serve` and `worker` (after logging is configured)."""
    for variable, closest in unknown_env_variables(environ):
        log_event(log, logging.WARNING, "config.unknown_variable", variable=variable,
                  hint=f"did you mean {closest}?" if closest else "no setting has a similar name",
                  closest=closest)
    if settings.uid_root == identity.DEFAULT_UID_ROOT:
        log_event(log, logging.WARNING, "config.default_uid_root", uid_root=settings.uid_root,
                  hint="derived UIDs use pydicom's example root; set DICOM_NODE_UID_ROOT to your organisation's root")
    keys = pseudonyms.active()
    log_event(log, logging.INFO, "config.pseudonym_key", key_id=keys.current.key_id, source=keys.source,
              generated=settings.pseudonym_key_file is None)


def freeze_startup_heap() -> None:
    """Move what start-up allocated (~110k objects: modules, dictionaries, contexts) out of the
    garbage collector's reach: none of it is garbage, and pynetdicom's server runs a full
    gc.collect() every 60 rounds of its accept loop, which walked all of it (~0.13 s with the GIL
    held, every instance on every association waiting)."""
    gc.freeze()
