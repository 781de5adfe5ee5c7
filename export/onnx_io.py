"""Write NiN as ONNX, and the card's metadata into it (metadata_props, values JSON strings)."""

from __future__ import annotations

import json
import os

import onnx

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 18


def export_onnx(model, path: str | os.PathLike, image_size: int = 224, in_channels: int = 1) -> None:
    """torch.onnx (dynamo exporter), opset pinned, dynamic batch; one self-contained file."""
    import torch

    model = model.eval()
    example = torch.randn(2, in_channels, image_size, image_size)  # batch >= 2, or it specializes to 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch}}, external_data=False,
    )
    program.save(str(path), external_data=False)


def write_metadata(model: onnx.ModelProto, meta: dict) -> None:
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in meta.items()})
