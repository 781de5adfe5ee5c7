"""The model card: everything a server and a reader need to know about one exported model."""

from __future__ import annotations

import platform

import onnx
import onnxruntime as ort

from training.checkpoint import command_from_args, training_summary  # noqa: F401 (re-exported)


def versions() -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }


def metadata_from_card(card: dict) -> dict:
    """The subset of the card embedded in the ONNX file's metadata_props."""
    return {
        "class_names": card["class_names"],
        "input_contract": card["input_contract"],
        "model_config": card["model_config"],
        "metrics": {"test_accuracy": card["test_accuracy"], "test_images": card["test_images"],
                    "per_class_accuracy": card["per_class_accuracy"]},
        "provenance": {"checkpoint_sha256": card["checkpoint_sha256"], **card["versions"], "opset": card["opset"]},
    }
