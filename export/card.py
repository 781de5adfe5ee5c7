"""The model card: everything a server and a reader need to know about one exported model."""

from __future__ import annotations

import platform

import onnx
import onnxruntime as ort


def command_from_args(args: dict) -> str | None:
    """The explicit `python -m training` command that reproduces a run's resolved arguments."""
    if not args:
        return None
    skip = {"resume", "out", "data_dir", "lr_find", "lr_find_steps", "init_from", "max_steps", "eval_limit"}
    parts = ["python -m training"]
    for k, v in args.items():
        if k in skip or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else f"--no-{k.replace('_', '-')}" if k in ("nesterov", "augment", "batch_norm") else "")
        else:
            parts.append(f"{flag} {v}")
    return " ".join(p for p in parts if p)


def training_summary(ckpt: dict, hardware: str | None = None) -> dict:
    metrics = ckpt.get("metrics") or []
    args = ckpt.get("args") or {}
    runtime = ckpt.get("runtime") or {}
    return {
        "preset": args.get("preset"),
        "args": args,
        "epochs_completed": ckpt.get("epoch"),
        "wall_time_s": round(sum(float(m.get("epoch_seconds", 0)) for m in metrics), 1),
        "last_epoch": metrics[-1] if metrics else None,
        "device": runtime.get("device") or args.get("device"),
        # checkpoints written before the runtime record existed: the caller says the hardware
        "hardware": runtime.get("hardware") or hardware,
        "command": runtime.get("command") or command_from_args(args),
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
