"""Checkpoints: plain dicts of tensors and primitives, written atomically, loadable with
`torch.load(weights_only=True)`, holding the model config needed to rebuild the network."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.config import NiNConfig
from training.model import NiN


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


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a NiN checkpoint (needs 'model' and 'model_config' keys)")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> tuple[NiN, NiNConfig]:
    """Rebuild the network from the checkpoint alone, in eval mode on the CPU."""
    config = NiNConfig.from_dict(ckpt["model_config"])
    model = NiN(config)
    model.load_state_dict(ckpt["model"])
    return model.eval(), config
