"""Typed stage artifacts: what one stage hands the next, and the only thing the next one reads.

priors  -> PriorRetrieval (dicom_node.priors.model): the chosen priors, their local files, the reasons
compare -> Comparison: the analysis result, the model's result, the overlay PNG, and the references
           and header the report needs (so the report stage re-reads no index rows or headers)
report  -> Reading (dicom_node.report.reading): the one merge of measurements and model findings,
           with the SR's identity; deliver and notify read it

Each is JSON, written atomically (temporary file, fsync, rename, fsync of the folder), so a crash
leaves the old artifact or the new one, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter

from inference.serialize import result_from_dict, result_to_dict
from inference.types import ComparisonResult
from inference.vlm.schema import DeviceFinding, Finding, VLMResult

from ..priors.model import PriorRetrieval
from ..refs import ImageRef, StudyRef
from ..storage import write_atomic

PRIORS_FILE = "priors.json"
COMPARISON_FILE = "comparison.json"
OVERLAY_FILE = "overlay.png"
READING_FILE = "reading.json"




class ArtifactMissing(Exception):
    """A stage's input artifact is not where the job row says (deleted work_dir?): the job must start over."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactMissing(f"artifact {path} is missing; run the job again (dicom-node retry)") from exc


# --- priors ----------------------------------------------------------------------------------

_PRIORS = TypeAdapter(PriorRetrieval)


def write_priors(path: Path, retrieval: PriorRetrieval) -> None:
    write_atomic(path, _PRIORS.dump_json(retrieval, indent=2))


def read_priors(path: Path) -> PriorRetrieval:
    return _PRIORS.validate_json(_read(path))


# --- compare ---------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The compare stage's output."""

    current: StudyRef  # the current study, with the instances analysed
    priors: list[StudyRef]  # each chosen prior, with the instances compared
    slice_refs: list[ImageRef]  # volumes: the current instance of each analysed slice, in analysis order
    current_header: dict  # DICOM JSON of the first analysed instance, without pixels (patient/study modules)
    result: ComparisonResult  # the analysis engine's result (overlay kept apart, as PNG)
    vlm: VLMResult | None = None  # the model's reading; None: no model configured
    overlay_png: str | None = None
    prior_report: str | None = None  # the text the model was given as the prior report
    model_name: str = ""
    model_version: str = ""
    algorithm_parameters: dict[str, str] = field(default_factory=dict)
    # DICOM JSON headers (no pixels) of the prior images compared, one per prior, for the SR's Image Library
    prior_headers: list[dict] = field(default_factory=list)


_REFS = TypeAdapter(list[StudyRef])
_SLICES = TypeAdapter(list[ImageRef])


def write_comparison(path: Path, comparison: Comparison) -> None:
    data = {
        "current": json.loads(_REFS.dump_json([comparison.current]))[0],
        "priors": json.loads(_REFS.dump_json(comparison.priors)),
        "slice_refs": json.loads(_SLICES.dump_json(comparison.slice_refs)),
        "current_header": comparison.current_header,
        "result": result_to_dict(comparison.result),
        "vlm": comparison.vlm.to_dict() if comparison.vlm is not None else None,
        "overlay_png": comparison.overlay_png,
        "prior_report": comparison.prior_report,
        "model_name": comparison.model_name,
        "model_version": comparison.model_version,
        "algorithm_parameters": comparison.algorithm_parameters,
        "prior_headers": comparison.prior_headers,
    }
    write_atomic(path, json.dumps(data, indent=2).encode())


def read_comparison(path: Path) -> Comparison:
    data = json.loads(_read(path))
    return Comparison(
        current=_REFS.validate_python([data["current"]])[0],
        priors=_REFS.validate_python(data["priors"]),
        slice_refs=_SLICES.validate_python(data["slice_refs"]),
        current_header=data["current_header"],
        result=result_from_dict(data["result"]),
        vlm=_vlm_from(data["vlm"]),
        overlay_png=data.get("overlay_png"),
        prior_report=data.get("prior_report"),
        model_name=data.get("model_name", ""),
        model_version=data.get("model_version", ""),
        algorithm_parameters=data.get("algorithm_parameters", {}),
        prior_headers=data.get("prior_headers", []),
    )


def _vlm_from(data: dict | None) -> VLMResult | None:
    if data is None:
        return None
    values = dict(data)
    values["findings"] = [Finding(**f) for f in values.get("findings", [])]
    values["devices"] = [DeviceFinding(**d) for d in values.get("devices", [])]
    return VLMResult(**values)


def load_overlay(comparison: Comparison):
    """The overlay image (RGB uint8) for the optional Secondary Capture, or None."""
    if not comparison.overlay_png:
        return None
    import numpy as np
    from PIL import Image

    with Image.open(comparison.overlay_png) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
