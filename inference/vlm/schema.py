"""Structured VLM output: typed findings, the one change/device vocabulary, synonym mapping."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..types import CHANGE_STATUSES, DEVICE_STATUSES

SEVERITIES: tuple[str, ...] = ("none", "mild", "moderate", "severe", "indeterminate")
PRIORITIES: tuple[str, ...] = ("routine", "urgent")

# Synonyms seen in radiology text, mapped onto DESIGN.md's vocabulary at parse time.
CHANGE_SYNONYMS: dict[str, str] = {
    "unchanged": "stable", "no change": "stable", "no interval change": "stable", "similar": "stable",
    "persistent": "stable", "stable appearance": "stable", "no significant change": "stable",
    "increased": "worsened", "worse": "worsened", "worsening": "worsened", "progressed": "worsened",
    "progression": "worsened", "enlarged": "worsened", "larger": "worsened", "increase": "worsened",
    "decreased": "improved", "better": "improved", "improving": "improved", "smaller": "improved",
    "regressed": "improved", "decrease": "improved", "partially resolved": "improved",
    "cleared": "resolved", "no longer seen": "resolved", "no longer visible": "resolved", "gone": "resolved",
    "interval resolution": "resolved",
    "newly appeared": "new", "appeared": "new", "interval development": "new", "new finding": "new",
    "uncertain": "indeterminate", "unclear": "indeterminate", "cannot assess": "indeterminate",
    "unknown": "indeterminate", "not assessable": "indeterminate",
}
DEVICE_SYNONYMS: dict[str, str] = {
    "inserted": "placed", "new": "placed", "added": "placed", "newly placed": "placed", "present": "placed",
    "withdrawn": "removed", "no longer present": "removed", "removed": "removed", "absent": "removed",
    "moved": "repositioned", "migrated": "repositioned", "advanced": "repositioned", "retracted": "repositioned",
    "stable": "unchanged", "no change": "unchanged", "in place": "unchanged", "same": "unchanged",
    "stable position": "unchanged",
}
SEVERITY_SYNONYMS: dict[str, str] = {
    "minimal": "mild", "small": "mild", "slight": "mild", "trace": "mild", "moderate": "moderate",
    "large": "severe", "marked": "severe", "extensive": "severe", "critical": "severe", "normal": "none",
    "unknown": "indeterminate",
}


def _key(text: Any) -> str:
    return re.sub(r"[\s_\-]+", " ", str(text).strip().lower())


def normalise(value: Any, vocab: tuple[str, ...], synonyms: dict[str, str]) -> str | None:
    """The vocabulary term for a model-written word, or None when it maps to nothing."""
    k = _key(value)
    if k in vocab:
        return k
    return synonyms.get(k)


@dataclass(frozen=True)
class Finding:
    finding: str
    region: str
    change: str  # one of CHANGE_STATUSES
    severity: str  # one of SEVERITIES
    evidence: str
    confidence: float  # 0..1
    source: str = "vlm"  # "vlm" or "measurement" (fallback from the analysis engine)


@dataclass(frozen=True)
class DeviceFinding:
    device: str
    status: str  # one of DEVICE_STATUSES


# Flags (codes) a result may carry; the node writes them into the SR and the logs.
FLAG_SINGLE_IMAGE = "single_image_mode"
FLAG_REPAIRED = "vlm_output_repaired"
FLAG_UNUSABLE = "vlm_output_unusable"
FLAG_COERCED = "vlm_vocabulary_coerced"
FLAG_DROPPED = "vlm_items_dropped"
FLAG_BACKEND_ERROR = "vlm_backend_error"


@dataclass
class VLMResult:
    findings: list[Finding] = field(default_factory=list)
    devices: list[DeviceFinding] = field(default_factory=list)
    impression: str = ""
    priority: str = "routine"
    flags: list[str] = field(default_factory=list)
    mode: str = "comparison"  # "comparison" | "single_image"
    model: str = ""
    prompt_set: str = ""
    raw_output: str = ""
    served_model: str = ""  # backend openai: the model name the server reported
    server_version: str = ""  # backend openai: the server's reported version
    latency_s: float | None = None  # wall time of the model call (its batch, in process)

    @property
    def usable(self) -> bool:
        return FLAG_UNUSABLE not in self.flags

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The JSON schema the model is asked to fill (also rendered into the prompt).
OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["findings", "devices", "impression", "priority"],
    "properties": {
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["finding", "region", "change", "severity", "evidence", "confidence"],
                "properties": {
                    "finding": {"type": "string"},
                    "region": {"type": "string"},
                    "change": {"enum": list(CHANGE_STATUSES)},
                    "severity": {"enum": list(SEVERITIES)},
                    "evidence": {"type": "string"},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
        "devices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["device", "status"],
                "properties": {"device": {"type": "string"}, "status": {"enum": list(DEVICE_STATUSES)}},
            },
        },
        "impression": {"type": "string"},
        "priority": {"enum": list(PRIORITIES)},
    },
}
