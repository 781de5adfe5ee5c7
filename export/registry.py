"""Register an exported model folder in BentoML's local model store."""

from __future__ import annotations

import shutil
from pathlib import Path

import bentoml

from serving.model_files import VARIANT_FILES


def register(folder: Path, card: dict, name: str) -> str:
    labels = {
        "dataset": "fashion-mnist",
        "architecture": "nin",
        "format": "onnx",
        "variants": "-".join(sorted(v for v, r in card["variants"].items() if r["passed"])),
    }
    metadata = {
        "test_accuracy": card["test_accuracy"],
        "test_images": card["test_images"],
        "opset": card["opset"],
        "model_sha256": card["files"][VARIANT_FILES["fp32"]]["sha256"],
        "checkpoint_sha256": card["checkpoint_sha256"],
    }
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                shutil.copy2(f, Path(model.path) / f.name)
    return str(model.tag)
