"""Find the exported model (a folder or a BentoML model tag), verify it against its card."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MODEL_NAME = "nin-fashion-mnist"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / MODEL_NAME
# An exported model folder: these files, named here once for export, serving and bench.
CARD = "card.json"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
# The shipped folder in BentoML's model store, version = its card's sha256 (store_version); the
# service declares it, `make serve` imports it, tests/test_shipped_model.py ties it to the card.
SHIPPED_TAG = f"{MODEL_NAME}:8f39e17edd674bd7"


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message is one line telling what and how to fix it."""


def resolve(source: str | None) -> Path:
    """A folder path, or a BentoML model tag (name[:version]) looked up in the local store;
    None is the shipped model (SHIPPED_TAG)."""
    source = source or SHIPPED_TAG
    if Path(source).exists():
        path = Path(source)
    elif "/" in source or source.startswith("."):
        raise ModelLoadError(f"model folder not found: {source} (NIN_MODEL)")
    else:
        try:
            import bentoml

            path = Path(bentoml.models.get(source).path)
        except Exception as e:
            hint = (f"; import the shipped one with `python -m serving.model_files {DEFAULT_MODEL}` (make serve does)"
                    if source == SHIPPED_TAG else "")
            raise ModelLoadError(f"model {source!r} is neither a folder nor a BentoML model tag "
                                 f"({type(e).__name__}: {str(e).splitlines()[0]}){hint}") from None
    if not (path / CARD).is_file():
        raise ModelLoadError(f"no card.json in {path}: export a checkpoint there with `python -m export CKPT --out {path}`")
    return path


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file: the model files' check against their card."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_card(folder: Path) -> dict:
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / CARD} is unreadable ({type(e).__name__}: {e})") from None
    for key in ("class_names", "input_contract", "files"):
        if key not in card:
            raise ModelLoadError(f"{folder / CARD} lacks {key!r}: re-export the model")
    if card["input_contract"].get("interpolation") != "bilinear":  # the one resize the server does
        raise ModelLoadError(f"{folder / CARD}: unsupported interpolation {card['input_contract'].get('interpolation')!r}")
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


def store_version(folder: Path) -> str:
    """A model folder's version in BentoML's store: its card's sha256, which names every file's."""
    return sha256(Path(folder) / CARD)[:16]


def import_to_store(folder: str | os.PathLike, name: str = MODEL_NAME) -> str:
    """The exported `folder` in BentoML's local model store as name:<store_version>, every file
    checked against its card first; a copy already there is checked the same way and kept."""
    import shutil

    import bentoml
    from bentoml.exceptions import NotFound

    folder = Path(folder)
    card = load_card(folder)
    for variant in available_variants(card):
        verified_file(folder, card, variant)
    tag = f"{name}:{store_version(folder)}"
    try:
        stored = Path(bentoml.models.get(tag).path)
    except NotFound:
        labels = {"dataset": "fashion-mnist", "architecture": "nin", "format": "onnx",
                  "variants": "-".join(available_variants(card))}
        metadata = {"test_accuracy": card.get("test_accuracy"), "card_sha256": sha256(folder / CARD),
                    "checkpoint_sha256": card.get("checkpoint_sha256")}
        with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    shutil.copy2(f, Path(model.path) / f.name)
        return tag
    if store_version(stored) != tag.split(":")[1]:
        raise ModelLoadError(f"{tag} in BentoML's model store does not match its card: remove it (bentoml models delete {tag})")
    for variant in available_variants(card):
        verified_file(stored, card, variant)
    return tag


if __name__ == "__main__":
    import sys

    try:
        print(import_to_store(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL))
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
