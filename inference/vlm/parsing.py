"""Model text -> VLMResult. Validated decoding: strict parse, one repair attempt, then fallback.

Nothing in here raises on model garbage: the worst case is the measured findings with
FLAG_UNUSABLE, so a confused model can never take the worker down.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Sequence

from ..types import CHANGE_STATUSES, DEVICE_STATUSES, ChangeRegion
from .schema import (
    CHANGE_SYNONYMS,
    DEVICE_SYNONYMS,
    FLAG_COERCED,
    FLAG_DROPPED,
    FLAG_REPAIRED,
    FLAG_UNUSABLE,
    PRIORITIES,
    SEVERITIES,
    SEVERITY_SYNONYMS,
    DeviceFinding,
    Finding,
    VLMResult,
    normalise,
)

_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.S)
_MAX_REPAIR_CUTS = 400  # bound the truncation search on long garbage


def _candidate(raw: str) -> str | None:
    """The JSON-looking part of the text: inside a code fence if any, from the first '{'."""
    m = _FENCE.search(raw)
    text = m.group(1) if m else raw
    start = text.find("{")
    return text[start:] if start >= 0 else None


def _strict(text: str) -> Any:
    obj, _ = json.JSONDecoder().raw_decode(text)  # trailing chatter after the object is fine
    return obj


def _closers(text: str) -> str | None:
    """Brackets needed to close `text` (string-aware); None if it ends inside a string."""
    stack: list[str] = []
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
    return None if in_str else "".join(reversed(stack))


def repair(text: str) -> Any:
    """One repair attempt: common syntax slips, then cut a truncated tail back to the last
    complete element and close the open brackets. Raises ValueError if nothing parses."""
    fixed = re.sub(r",\s*([}\]])", r"\1", text)
    fixed = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", fixed)))
    # Candidate ends: the whole text, then just after each complete-looking token, from the back.
    ends = [len(fixed)] + [i + 1 for i in range(len(fixed) - 1, 0, -1) if fixed[i] in '}]"el0123456789']
    for end in ends[:_MAX_REPAIR_CUTS]:
        head = fixed[:end].rstrip().rstrip(",:").rstrip()
        close = _closers(head)
        if close is None:
            continue
        try:
            return _strict(head + close)
        except ValueError:
            continue
    raise ValueError("no repairable JSON object")


def _text(v: Any) -> str:
    return v.strip() if isinstance(v, str) else ("" if v is None else str(v))


def _confidence(v: Any) -> float | None:
    try:
        c = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(c):
        return None
    return min(1.0, max(0.0, c / 100.0 if 1.0 < c <= 100.0 else c))  # "85" means 85 %


def _findings(items: Any, flags: set[str]) -> list[Finding]:
    out = []
    for it in items:
        if not isinstance(it, dict) or not _text(it.get("finding")):
            flags.add(FLAG_DROPPED)
            continue
        change = normalise(it.get("change", ""), CHANGE_STATUSES, CHANGE_SYNONYMS)
        severity = normalise(it.get("severity", ""), SEVERITIES, SEVERITY_SYNONYMS)
        conf = _confidence(it.get("confidence"))
        if change is None or severity is None or conf is None:
            flags.add(FLAG_COERCED)
        out.append(
            Finding(
                finding=_text(it["finding"]),
                region=_text(it.get("region")),
                change=change or "indeterminate",
                severity=severity or "indeterminate",
                evidence=_text(it.get("evidence")),
                confidence=0.0 if conf is None else conf,
            )
        )
    return out


def _devices(items: Any, flags: set[str]) -> list[DeviceFinding]:
    out = []
    for it in items:
        if not isinstance(it, dict) or not _text(it.get("device")):
            flags.add(FLAG_DROPPED)
            continue
        status = normalise(it.get("status", ""), DEVICE_STATUSES, DEVICE_SYNONYMS)
        if status is None:
            flags.add(FLAG_DROPPED)  # a device with no usable status says nothing
            continue
        out.append(DeviceFinding(device=_text(it["device"]), status=status))
    return out


def validate(obj: Any) -> tuple[list[Finding], list[DeviceFinding], str, str, set[str]]:
    """Schema check + normalisation. Raises ValueError when the object is not a result at all."""
    if not isinstance(obj, dict):
        raise ValueError("top level is not an object")
    findings, devices = obj.get("findings", []), obj.get("devices", [])
    if not isinstance(findings, list) or not isinstance(devices, list):
        raise ValueError("findings/devices are not lists")
    if "findings" not in obj and "impression" not in obj:
        raise ValueError("neither findings nor impression present")
    flags: set[str] = set()
    f, d = _findings(findings, flags), _devices(devices, flags)
    priority = _text(obj.get("priority")).lower() or "routine"
    if priority not in PRIORITIES:
        flags.add(FLAG_COERCED)
        priority = "urgent" if priority in ("stat", "emergent", "critical", "high") else "routine"
    return f, d, _text(obj.get("impression")), priority, flags


def fallback_findings(regions: Sequence[ChangeRegion]) -> list[Finding]:
    """The analysis engine's measured regions as findings (used when the model output is unusable)."""
    out = []
    for r in regions:
        size = f"{r.volume_mm3:.0f} mm3" if r.volume_mm3 is not None else f"{r.area_mm2:.0f} mm2"
        out.append(
            Finding(
                finding="measured density change",
                region=r.zone,
                change=normalise(r.status, CHANGE_STATUSES, CHANGE_SYNONYMS) or "indeterminate",
                severity="indeterminate",
                evidence=f"{size}, longest diameter {r.longest_diameter_mm:.1f} mm, "
                f"mean intensity change {r.mean_change:+.2f} (measured)",
                confidence=float(r.confidence),
                source="measurement",
            )
        )
    return out


def parse_output(raw: str, regions: Sequence[ChangeRegion]) -> VLMResult:
    """Model text -> result; never raises on model output."""
    flags: list[str] = []
    cand = _candidate(raw or "")
    obj: Any = None
    if cand is not None:
        try:
            obj = _strict(cand)
        except ValueError:
            try:
                obj = repair(cand)
                flags.append(FLAG_REPAIRED)
            except ValueError:
                obj = None
    if obj is not None:
        try:
            findings, devices, impression, priority, extra = validate(obj)
            return VLMResult(findings, devices, impression, priority, flags + sorted(extra), raw_output=raw)
        except ValueError:
            pass
    return fallback_result(regions, raw)


def fallback_result(regions: Sequence[ChangeRegion], raw: str = "") -> VLMResult:
    findings = fallback_findings(regions)
    # Measured new/worsened change still reaches the worklist when the model fails.
    urgent = any(f.change in ("new", "worsened") for f in findings)
    impression = (
        "Model output unusable; measured changes only: " + "; ".join(f"{f.region} {f.change}" for f in findings)
        if findings
        else "Model output unusable; the analysis engine measured no significant change."
    )
    return VLMResult(findings, [], impression, "urgent" if urgent else "routine", [FLAG_UNUSABLE], raw_output=raw)
