"""Vision encoder (+ projector) -> ONNX, with a dynamic image-batch axis.

Exported in float32 from a float32 copy of the weights: TensorRT picks its own precision at
build time, ONNX Runtime on CPU wants float32."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch

from .adapters import Adapter

log = logging.getLogger(__name__)
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
OPSET = 18


def export_vision_encoder(adapter: Adapter, model: torch.nn.Module, path: Path, example_batch: int = 2) -> Path:
    """Write `path` (and its external-data file if large); returns the path."""
    # A float32 CPU copy: converting in place would change the serving model's dtype/device.
    module = copy.deepcopy(adapter.export_module(model)).float().cpu().eval()
    c, h, w = adapter.image_shape
    example = torch.randn(example_batch, c, h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("images", min=1, max=256)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"pixel_values": {0: batch}},
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    # Large encoders (SigLIP-400M is ~1.6 GB in fp32) exceed protobuf's 2 GB: external data.
    prog.save(str(path), external_data=True)
    log.info("exported vision encoder to %s", path)
    return path
