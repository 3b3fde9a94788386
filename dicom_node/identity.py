"""How the node names itself in the objects it writes, so it can recognise them again
(e.g. never pick its own report as a prior study, never analyse it)."""

MANUFACTURER = "dicom-node project"
MANUFACTURER_MODEL_NAME = "DICOM Node comparative analysis"
SOFTWARE_VERSION = "0.1.0"
RESULT_SERIES_DESCRIPTION = "AI comparison report"
OVERLAY_SERIES_DESCRIPTION = "AI change overlay"
# Root for UIDs the node derives deterministically (pydicom's root; a site may set its own).
UID_ROOT = "1.2.826.0.1.3680043.8.498."
