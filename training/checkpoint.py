"""Checkpoints: plain dicts of tensors and primitives, written atomically, loadable with
`torch.load(weights_only=True)`, holding the model config needed to rebuild the network."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from training.config import NiNConfig
from training.model import NiN


def sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)`, then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data, indent: int = 1) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent)))


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({load_error(e)})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a NiN checkpoint (needs 'model' and 'model_config' keys)")
    return ckpt


def load_error(e: Exception) -> str:
    """torch.load's failure in one line. Its weights-only refusal is a paragraph that suggests
    `weights_only=False` (unsafe, and never needed for this project's checkpoints): say what it means."""
    text = str(e)
    if "Weights only load failed" in text:
        return "not a file written by torch.save with tensors and plain values only, as `python -m training` writes"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def model_from_checkpoint(ckpt: dict) -> tuple[NiN, NiNConfig]:
    """Rebuild the network from the checkpoint alone, in eval mode on the CPU."""
    config = NiNConfig.from_dict(ckpt["model_config"])
    model = NiN(config)
    load_weights(model, ckpt["model"])
    return model.eval(), config


def load_weights(model: torch.nn.Module, state: dict, source: str = "the checkpoint") -> None:
    """load_state_dict, with a mismatch said in one line (torch's message is a paragraph)."""
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds no weights (its 'model' is a {type(state).__name__}, not a state dict)")
    own = model.state_dict()
    problems = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "of the wrong shape": [k for k in own if k in state and getattr(state[k], "shape", None) != own[k].shape],
    }
    if any(problems.values()):
        said = "; ".join(f"{len(keys)} {what} (first: {keys[0]})" for what, keys in problems.items() if keys)
        raise ValueError(f"the weights in {source} do not fit its model config: {said}")
    model.load_state_dict(state)


def command_from_args(args: dict) -> str | None:
    """The explicit `python -m training` command that reproduces a run's resolved arguments
    (for checkpoints written before the runtime record kept the command line)."""
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
    """How a checkpoint came to be: command, hardware, epochs, wall time, per-epoch metrics, and
    (for a run started with --init-from) the same record of the run it started from, so a
    fine-tuned model's card shows its whole history. `hardware` is the fallback for
    checkpoints written before the runtime record existed."""
    metrics = ckpt.get("metrics") or []
    args = ckpt.get("args") or {}
    runtime = ckpt.get("runtime") or {}
    own = round(sum(float(m.get("epoch_seconds", 0)) for m in metrics), 1)
    summary = {
        "preset": args.get("preset"),
        "args": args,
        "epochs_completed": ckpt.get("epoch"),
        "wall_time_s": own,
        "last_epoch": metrics[-1] if metrics else None,
        "metrics": metrics,
        "device": runtime.get("device") or args.get("device"),
        "hardware": runtime.get("hardware") or hardware,
        "command": runtime.get("command") or command_from_args(args),
    }
    parent = runtime.get("parent")
    if parent is None and args.get("init_from") and Path(args["init_from"]).is_file():
        parent = parent_record(args["init_from"], hardware)
    elif parent is not None and hardware:
        parent = _with_hardware(parent, hardware)
    if parent is not None:
        summary["init_from"] = parent
        summary["total_wall_time_s"] = round(own + parent.get("total_wall_time_s", parent["wall_time_s"]), 1)
    return summary


def _with_hardware(record: dict, hardware: str) -> dict:
    """`record` and the records it started from, with `hardware` where a run did not record it
    (runs from before the runtime record existed)."""
    out = {**record, "hardware": record.get("hardware") or hardware}
    if out.get("init_from"):
        out["init_from"] = _with_hardware(out["init_from"], hardware)
    return out


def parent_record(path: str | os.PathLike, hardware: str | None = None) -> dict:
    """The summary of the checkpoint a run starts from, with its path and sha256."""
    return {"path": str(path), "sha256": sha256(path), **training_summary(load_checkpoint(path), hardware)}
