"""How the node names itself in the objects it writes, so it can recognise them again
(e.g. never pick its own report as a prior study, never analyse it)."""

MANUFACTURER = "dicom-node project"
MANUFACTURER_MODEL_NAME = "DICOM Node comparative analysis"
SOFTWARE_VERSION = "0.1.0"
RESULT_SERIES_DESCRIPTION = "AI comparison report"
OVERLAY_SERIES_DESCRIPTION = "AI change overlay"
# pydicom's example root: the default, for trying the node out; a site sets its own (setting uid_root).
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."
# Root for UIDs the node derives deterministically; set_uid_root() applies the setting at start.
UID_ROOT = DEFAULT_UID_ROOT


def set_uid_root(root: str) -> None:
    """Use `root` (already checked by uids.check_uid_root via the settings) for derived UIDs in this process."""
    global UID_ROOT
    UID_ROOT = root
