"""Comparative image analysis: pixels, sanity gate, registration, measured change regions.

Importing this package is cheap: SimpleITK and scipy load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InputError
from .types import (
    CHANGE_STATUSES,
    ChangeRegion,
    ComparisonResult,
    ImageInput,
    RegistrationQuality,
    SanityFlag,
)

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence


def compare(current: ImageInput, priors: "Sequence[ImageInput]", **options) -> ComparisonResult:
    """Compare `current` with the most recent usable prior; see inference.pipeline.compare."""
    from .pipeline import compare as _compare

    return _compare(current, list(priors), **options)


def __getattr__(name: str):
    # Lazy re-exports, so `import inference` stays light.
    if name in ("load_image", "load_folder", "load_path", "image_from_dataset", "volume_from_datasets"):
        from . import pixels

        return getattr(pixels, name)
    if name == "result_to_dict":
        from .serialize import result_to_dict

        return result_to_dict
    if name == "save_overlay_png":
        from .overlay import save_overlay_png

        return save_overlay_png
    raise AttributeError(f"module 'inference' has no attribute {name!r}")


__all__ = [
    "CHANGE_STATUSES", "ChangeRegion", "ComparisonResult", "ImageInput", "InputError", "RegistrationQuality",
    "SanityFlag", "compare", "load_folder", "load_image", "load_path", "result_to_dict", "save_overlay_png",
]
