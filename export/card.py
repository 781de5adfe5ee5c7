"""The model card: everything a server and a reader need to know about one exported model."""

from __future__ import annotations

import platform

import onnx
import onnxruntime as ort


def training_summary(ckpt: dict) -> dict:
    metrics = ckpt.get("metrics") or []
    args = ckpt.get("args") or {}
    runtime = ckpt.get("runtime") or {}
    return {
        "preset": args.get("preset"),
        "args": args,
        "epochs_completed": ckpt.get("epoch"),
        "wall_time_s": round(sum(float(m.get("epoch_seconds", 0)) for m in metrics), 1),
        "last_epoch": metrics[-1] if metrics else None,
        "device": runtime.get("device"),
        "hardware": runtime.get("hardware"),
        "command": runtime.get("command"),
    }


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
