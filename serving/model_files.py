"""Find the exported model (a folder or a BentoML model tag), verify it against its card."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "nin-fashion-mnist"
# An exported model folder: these files, named here once for export, serving and bench.
CARD = "card.json"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message is one line telling what and how to fix it."""


def resolve(source: str | None) -> Path:
    """A folder path, or a BentoML model tag (name[:version]) looked up in the local store."""
    if not source:
        path = DEFAULT_MODEL
    elif Path(source).exists():
        path = Path(source)
    elif "/" in source or source.startswith("."):
        raise ModelLoadError(f"model folder not found: {source} (NIN_MODEL)")
    else:
        try:
            import bentoml

            path = Path(bentoml.models.get(source).path)
        except Exception as e:
            raise ModelLoadError(f"model {source!r} is neither a folder nor a BentoML model tag ({type(e).__name__}: {e})") from None
    if not (path / CARD).is_file():
        raise ModelLoadError(f"no card.json in {path}: export a checkpoint there with `python -m export CKPT --out {path}`")
    return path


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks: the one hasher for checkpoints, model files and the
    server's verification against the card (torch-free, so the server can use it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(folder: Path) -> dict:
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / CARD} is unreadable ({type(e).__name__}: {e})") from None
    for key in ("class_names", "input_contract", "files"):
        if key not in card:
            raise ModelLoadError(f"{folder / CARD} lacks {key!r}: re-export the model")
    return card


def verified_file(folder: Path, card: dict, variant: str) -> Path:
    """The variant's file, after checking its sha256 against the card."""
    name = VARIANT_FILES[variant]
    path = folder / name
    if name not in card["files"]:
        raise ModelLoadError(f"variant {variant} is not in {folder} (card lists {sorted(card['files'])})")
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing although card.json lists it")
    digest = sha256(path)
    if digest != card["files"][name]["sha256"]:
        raise ModelLoadError(f"{path} does not match its card (sha256 {digest[:12]}… vs {card['files'][name]['sha256'][:12]}…): "
                             "the file was altered or truncated; re-export it")
    return path


def available_variants(card: dict) -> list[str]:
    return [v for v, name in VARIANT_FILES.items() if name in card["files"]]


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)
