"""Comparative prompt layout from a versioned prompt set (data in prompts/*.yaml).

The output is family-neutral: a sequence of text parts and image slots. Each adapter turns
image slots into its own placeholder tokens and chat markup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import yaml

from ..types import CHANGE_STATUSES, DEVICE_STATUSES, ChangeRegion, ImageInput
from .errors import ModelConfigError
from .imaging import crop_pair, rank_regions, to_display
from .schema import OUTPUT_SCHEMA

PROMPTS_DIR = Path(__file__).parent / "prompts"
_TEMPLATE_KEYS = (
    "system", "image_prior", "image_current", "image_single", "interval", "single_mode", "indication",
    "prior_report", "regions_header", "region", "no_regions", "crop_pair", "questions_header", "question", "output",
)


# No usable prior: the query next to matched normals of other people (issue 17). A prompt set may
# override these; the defaults keep older prompt sets valid.
REFERENCE_TEMPLATES = {
    "system_reference": (
        "You are a radiologist reading a patient's {modality} {body_part} study. No prior study of this patient "
        "is usable; normal reference images of other, healthy people are shown for comparison. They are not "
        "the patient."),
    "image_reference": "Image {index}: NORMAL REFERENCE, another person, matched by {why}",
    "reference_mode": (
        "Compare image 1 with the normal reference image(s) and report what in image 1 the normals do not show. "
        "Differences of anatomy, positioning and exposure between people are not findings. No change over time "
        "can be assessed: use change \"indeterminate\"."),
    "regions_header_reference": (
        "Regions where image 1 deviates beyond the variation of the normal references (measured by the analysis "
        "engine after registering the references onto image 1):"),
}


# Older priors (several time points, issue 14): shown before the compared prior, oldest first.
OLDER_TEMPLATES = {
    "image_older_prior": "OLDER PRIOR image ({date}, {view}); each finding below was also measured on it:",
}


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: str
    anatomy: dict[str, tuple[str, ...]]
    templates: dict[str, str]

    def anatomy_for(self, body_part: str) -> tuple[str, ...]:
        key = (body_part or "").strip().lower()
        return self.anatomy.get(key) or self.anatomy.get("default") or ()


@lru_cache(maxsize=16)
def load_prompt_set(name: str) -> PromptSet:
    path = Path(name) if name.endswith(".yaml") else PROMPTS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml"))
        raise ModelConfigError(f"prompt set {name!r} not found at {path}; known prompt sets: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    templates = data.get("templates") or {}
    missing = [k for k in _TEMPLATE_KEYS if k not in templates]
    if missing:
        raise ModelConfigError(f"{path}: prompt set lacks templates {missing}")
    anatomy = {str(k).lower(): tuple(v) for k, v in (data.get("anatomy") or {}).items()}
    return PromptSet(str(data.get("name", path.stem)), str(data.get("version", "0")), anatomy, dict(templates))


@dataclass(frozen=True)
class ImageSlot:
    """An image in the prompt: display-ready uint8 (rows, cols) and its role."""

    pixels: np.ndarray
    role: str  # "prior" | "current" | "prior_crop" | "current_crop"


Part = Union[str, ImageSlot]


@dataclass(frozen=True)
class Prompt:
    parts: tuple[Part, ...]
    single_image: bool
    prompt_set: str  # name@version

    @property
    def images(self) -> list[ImageSlot]:
        return [p for p in self.parts if isinstance(p, ImageSlot)]

    @property
    def text(self) -> str:
        """Text-only view (images as <image:role>), for logs and tests."""
        return "\n".join(p if isinstance(p, str) else f"<image:{p.role}>" for p in self.parts)


def _date(img: ImageInput) -> str:
    return img.acquired_on.isoformat() if img.acquired_on else "date unknown"


def _view(img: ImageInput) -> str:
    return img.view or "view unknown"


def _interval(current: ImageInput, prior: ImageInput) -> str:
    if not (current.acquired_on and prior.acquired_on):
        return "unknown"
    days = (current.acquired_on - prior.acquired_on).days
    return f"{days} day{'s' if abs(days) != 1 else ''}"


def _size(r: ChangeRegion) -> str:
    """The finding's measured trajectory, oldest first with dates, when it was measured at every time point
    (measurements come from the tools, not from the model's eye); else the size of the region of change."""
    if r.timepoints:
        steps = []
        for t in r.timepoints:
            when = t.date.isoformat() if t.date else "undated"
            steps.append(f"{when}: {t.long_axis_mm:.1f} x {t.short_axis_mm:.1f} mm" if t.present else f"{when}: absent")
        trend = f", trend {r.trend}" if r.trend else ""
        return f"{r.lesion_type or 'finding'} measured " + " -> ".join(steps) + trend
    if r.volume_mm3 is not None:
        return f"volume {r.volume_mm3:.0f} mm3, longest diameter {r.longest_diameter_mm:.1f} mm"
    return f"area {r.area_mm2:.0f} mm2, longest diameter {r.longest_diameter_mm:.1f} mm"


def build_prompt(
    ps: PromptSet,
    current: ImageInput,
    prior: ImageInput | None,
    regions: Sequence[ChangeRegion],
    prior_report: str | None = None,
    indication: str | None = None,
    max_regions: int = 4,
    references: Sequence[tuple[ImageInput, str]] = (),
    older: Sequence[ImageInput] = (),
) -> Prompt:
    """`references`: with no prior, normal images of other people (image, why it was matched), shown after
    the current one with their role stated. `older`: the older priors the findings were measured on,
    oldest first; with the prior and the current the images then run in date order, each dated."""
    t = {**OLDER_TEMPLATES, **ps.templates}
    if prior is None and references:
        return _reference_prompt(ps, current, regions, indication, max_regions, references)
    parts: list[Part] = [
        t["system"].format(modality=current.modality or "radiograph", body_part=current.body_part or "").replace("  ", " ")
    ]
    cur_px = to_display(current.pixels)
    if prior is None:
        parts += [t["image_single"].format(date=_date(current), view=_view(current)), ImageSlot(cur_px, "current")]
        parts.append(t["single_mode"])
    else:
        for image in older:
            parts += [t["image_older_prior"].format(date=_date(image), view=_view(image)),
                      ImageSlot(to_display(image.pixels), "prior")]
        parts += [t["image_prior"].format(date=_date(prior), view=_view(prior)), ImageSlot(to_display(prior.pixels), "prior")]
        parts += [t["image_current"].format(date=_date(current), view=_view(current)), ImageSlot(cur_px, "current")]
        parts.append(t["interval"].format(interval=_interval(current, prior)))
    if indication:
        parts.append(t["indication"].format(indication=indication.strip()))
    if prior is not None and prior_report:
        parts.append(t["prior_report"].format(prior_report=prior_report.strip()))
    if prior is not None:
        ranked = rank_regions(regions, max_regions)
        if ranked:
            parts.append(t["regions_header"])
            for i, r in enumerate(ranked, 1):
                parts.append(t["region"].format(index=i, zone=r.zone, size=_size(r), mean_change=r.mean_change, status=r.status))
            for i, r in enumerate(ranked, 1):
                p_crop, c_crop = crop_pair(prior.pixels, current.pixels, r.bbox)
                parts += [t["crop_pair"].format(index=i, zone=r.zone), ImageSlot(p_crop, "prior_crop"), ImageSlot(c_crop, "current_crop")]
        else:
            parts.append(t["no_regions"])
    parts.append(t["questions_header"])
    parts += [t["question"].format(region=a) for a in ps.anatomy_for(current.body_part)]
    parts.append(
        t["output"].format(
            schema=json.dumps(OUTPUT_SCHEMA, separators=(",", ":")),
            changes=", ".join(f'"{c}"' for c in CHANGE_STATUSES),
            device_statuses=", ".join(f'"{d}"' for d in DEVICE_STATUSES),
        )
    )
    return Prompt(tuple(parts), prior is None, f"{ps.name}@{ps.version}")


def _reference_prompt(ps: PromptSet, current: ImageInput, regions: Sequence[ChangeRegion], indication: str | None,
                      max_regions: int, references: Sequence[tuple[ImageInput, str]]) -> Prompt:
    t = {**REFERENCE_TEMPLATES, **ps.templates}
    parts: list[Part] = [
        t["system_reference"].format(modality=current.modality or "radiograph", body_part=current.body_part or "").replace("  ", " "),
        t["image_single"].format(date=_date(current), view=_view(current)), ImageSlot(to_display(current.pixels), "current"),
    ]
    for index, (image, why) in enumerate(references, 2):
        parts += [t["image_reference"].format(index=index, why=why), ImageSlot(to_display(image.pixels), "reference")]
    parts.append(t["reference_mode"])
    if indication:
        parts.append(t["indication"].format(indication=indication.strip()))
    ranked = rank_regions(regions, max_regions)
    if ranked:
        parts.append(t["regions_header_reference"])
        parts += [t["region"].format(index=i, zone=r.zone, size=_size(r), mean_change=r.mean_change, status=r.status)
                  for i, r in enumerate(ranked, 1)]
    parts.append(t["questions_header"])
    parts += [t["question"].format(region=a) for a in ps.anatomy_for(current.body_part)]
    parts.append(t["output"].format(schema=json.dumps(OUTPUT_SCHEMA, separators=(",", ":")),
                                    changes=", ".join(f'"{c}"' for c in CHANGE_STATUSES),
                                    device_statuses=", ".join(f'"{d}"' for d in DEVICE_STATUSES)))
    return Prompt(tuple(parts), True, f"{ps.name}@{ps.version}")
