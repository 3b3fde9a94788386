"""The reading: ONE merge of the measured regions and the model's findings, made once per job.

The SR, the optional overlay SC and the HL7 ORU are all built from the same Reading, so the PACS
and the RIS can never be told different things about one job. A revision (re-analysis after
late instances) keeps the Tracking UIDs of the findings its predecessor already reported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from inference.types import ChangeRegion, ComparisonResult
from inference.vlm.schema import DeviceFinding, Finding, VLMResult

from .. import identity
from ..refs import ImageRef
from ..worklist import FLAGGED_CHANGES

FINDING, MEASURED, DEVICE = "finding", "measured", "device"


@dataclass
class ReadingFinding:
    label: str  # what is found ("nodule", "measured increase in density", "central line")
    zone: str
    status: str  # the node vocabulary: a change status, or a device status for devices
    category: str  # finding (the model's, maybe with its measured region) | measured (no model words) | device
    kind: str  # stable word for the finding (its SNOMED code when known), part of the tracking key
    region: ChangeRegion | None = None
    text: str = ""  # the model's words
    evidence: str = ""
    tracking_uid: str = ""
    tracking_id: str = ""  # human-readable Tracking Identifier


@dataclass
class Reading:
    study_uid: str
    findings: list[ReadingFinding] = field(default_factory=list)
    impression: str = ""
    revision: int = 1  # 1: the study's first report; n: the (n-1)th correction
    predecessor_sr: ImageRef | None = None  # the report this one revises
    sr_sop_instance_uid: str = ""
    sr_series_uid: str = ""
    overlay_sop_instance_uid: str = ""

    @property
    def changes(self) -> tuple[str, ...]:
        return tuple(f.status for f in self.findings if f.category != DEVICE)

    @property
    def flagged(self) -> bool:
        return any(change in FLAGGED_CHANGES for change in self.changes)

    @property
    def is_revision(self) -> bool:
        return self.predecessor_sr is not None

    def to_json(self) -> bytes:
        return _ADAPTER.dump_json(self, indent=2)

    @classmethod
    def from_json(cls, data: bytes | str) -> "Reading":
        return _ADAPTER.validate_json(data)


_ADAPTER = TypeAdapter(Reading)


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split())


def _take_region(regions: list[ChangeRegion], f: Finding) -> ChangeRegion | None:
    """The measured region in the zone the model named (same change direction preferred)."""
    same_zone = [r for r in regions if _norm(r.zone) == _norm(f.region)]
    if not same_zone:
        return None
    same_zone.sort(key=lambda r: (r.status != f.change, -r.confidence))
    regions.remove(same_zone[0])
    return same_zone[0]


def _model_finding(f: Finding, region: ChangeRegion | None) -> ReadingFinding:
    from .codes import finding_kind

    return ReadingFinding(
        label=f.finding, zone=f.region, status=f.change, category=FINDING, kind=finding_kind(f.finding), region=region,
        text=f.finding,
        evidence=f"{f.evidence} (severity {f.severity}, confidence {f.confidence:.2f}, source {f.source})".strip(),
    )


def _measured(region: ChangeRegion) -> ReadingFinding:
    """A finding the analysis measured without model words, named only as far as the pixels tell
    (inference's lesion_type). Its tracking key does not depend on the direction of change, so a
    lesion that turns from growing to shrinking keeps its Tracking UID."""
    direction = "increase" if region.kind != "decrease" else "decrease"
    label = region.lesion_type or f"measured {direction} in density"
    return ReadingFinding(label=label, zone=region.zone, status=region.status, category=MEASURED,
                          kind="measured", region=region)


def _device(d: DeviceFinding) -> ReadingFinding:
    return ReadingFinding(label=d.device, zone="device", status=d.status, category=DEVICE,
                          kind="device " + _norm(d.device), text=d.device, evidence=f"device {d.status}")


def _tracking_uid(study_uid: str, zone: str, kind: str, ordinal: int) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=identity.UID_ROOT, entropy_srcs=["tracking", study_uid, zone.strip().lower(), kind, str(ordinal)])


def _assign_tracking(study_uid: str, findings: list[ReadingFinding], predecessor: Reading | None,
                     tracked: list | None = None) -> None:
    """Same lesion (zone and kind, in order), same Tracking UID: taken from the predecessor when it
    reported it; else from an earlier report of a prior study that outlined it at the same registered
    place (report/tracking.py); else derived from where and what (never from the run)."""
    from .tracking import match
    earlier: dict[tuple[str, str, int], ReadingFinding] = {}
    if predecessor is not None:
        seen: Counter = Counter()
        for f in predecessor.findings:
            key = (_norm(f.zone), f.kind)
            earlier[(*key, seen[key])] = f
            seen[key] += 1
    seen = Counter()
    for f in findings:
        key = (_norm(f.zone), f.kind)
        ordinal = seen[key]
        seen[key] += 1
        before = earlier.get((*key, ordinal))
        followed = match(f.region, tracked) if before is None and tracked and f.region is not None else None
        if followed is not None:
            tracked = [t for t in tracked if t.tracking_uid != followed.tracking_uid]  # one lesion, one finding
            f.tracking_uid, f.tracking_id = followed.tracking_uid, followed.tracking_id[:64] or f"{f.label} / {f.zone}"
            continue
        f.tracking_uid = before.tracking_uid if before else _tracking_uid(study_uid, f.zone, f.kind, ordinal)
        f.tracking_id = (f"{f.label} / {f.zone}" + (f" #{ordinal + 1}" if ordinal else ""))[:64]


def build_reading(study_uid: str, comparison: ComparisonResult, vlm: VLMResult | None,
                  predecessor: Reading | None = None, tracked: list | None = None) -> Reading:
    """Model findings first, each with the measured region in its zone; then the measured regions the
    model did not describe (or all of them without usable model output); then devices."""
    regions = list(comparison.regions) if not comparison.refused else []
    model = vlm if vlm is not None and vlm.usable else None
    findings: list[ReadingFinding] = []
    if model is not None:
        findings.extend(_model_finding(f, _take_region(regions, f)) for f in model.findings)
    findings.extend(_measured(region) for region in regions)
    if model is not None:
        findings.extend(_device(d) for d in model.devices)
    _assign_tracking(study_uid, findings, predecessor, tracked)
    impression = model.impression if model is not None and model.impression else comparison.summary
    return Reading(study_uid=study_uid, findings=findings, impression=impression,
                   revision=(predecessor.revision + 1) if predecessor else 1)
