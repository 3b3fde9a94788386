"""Settings of the normal reference library (nested under Settings.references; env DICOM_NODE_REFERENCES__...)."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import BaseModel, Field


class ReferenceSettings(BaseModel):
    library_dir: Path = Path("var/references")  # the library: instances/ (de-identified DICOM) and index.json
    enabled: bool = True  # compare against normal references when the patient has no usable prior
    beside_prior: bool = False  # also compare against references when a prior comparison ran
    count: int = Field(5, ge=1, le=20)  # references selected per comparison (the per-pixel normal model)
    prompt_count: int = Field(2, ge=0, le=4)  # of those, shown to the VLM next to the query
    # what references are matched by besides the thumbnail (encoder.py): the local model's vision encoder
    descriptor: Literal["auto", "vision_encoder", "thumbnail"] = "auto"
