"""Write NiN as ONNX and read/write the metadata it carries. No torch needed to read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 18
# metadata_props keys; values are JSON strings.
META_KEYS = ("class_names", "input_contract", "model_config", "metrics", "provenance")


class InvalidModelError(ValueError):
    """The file is missing, not ONNX, or not a NiN export of this project."""


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


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise InvalidModelError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from e


def write_metadata(model: onnx.ModelProto, meta: dict) -> None:
    onnx.helper.set_model_props(model, {key: json.dumps(meta[key]) for key in META_KEYS if key in meta})


def read_metadata(model: onnx.ModelProto | dict) -> dict:
    """The metadata as Python objects; accepts a ModelProto or onnxruntime's custom_metadata_map."""
    props = model if isinstance(model, dict) else {p.key: p.value for p in model.metadata_props}
    missing = [k for k in ("class_names", "input_contract") if k not in props]
    if missing:
        raise InvalidModelError(f"model metadata lacks {missing}: not exported by `python -m export`")
    return {k: json.loads(v) for k, v in props.items() if k in META_KEYS}
