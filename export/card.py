"""The model card: everything a server and a reader need to know about one exported model."""

from __future__ import annotations

import platform

import onnx
import onnxruntime as ort


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


def _lineage(training: dict) -> list[dict]:
    """The runs behind a model, oldest first (a fine-tune's --init-from parent before it)."""
    runs, run = [], training
    while run is not None:
        runs.append(run)
        run = run.get("init_from")
    return runs[::-1]


def _cell(v, key: str) -> str:
    return "" if v is None else f"{v:.4f}" if key.endswith(("_loss", "_acc")) else str(v)


def card_markdown(card: dict) -> str:
    """card.json as a page for people: accuracy, how it was trained, variants, files."""
    par = card["checks"]["parity"]
    runs = _lineage(card["training"])
    total_s = card["training"].get("total_wall_time_s", card["training"]["wall_time_s"])
    out = [
        f"# {card['name']}", "",
        f"NiN ({card['model_config']['num_1x1']} 1x1 convs per block, "
        f"{'with' if card['model_config']['batch_norm'] else 'without'} BatchNorm) "
        f"on Fashion-MNIST, input {card['input_contract']['channels']}x{card['input_contract']['image_size']}"
        f"x{card['input_contract']['image_size']} grayscale.", "",
        f"**Test accuracy {card['test_accuracy']:.4f}** on all {card['test_images']:,} test images (ONNX fp32; "
        f"PyTorch {par['reference_accuracy']:.4f}; max |dlogit| {par['max_abs_diff']:.1e}, "
        f"argmax agreement {par['argmax_agreement']:.2%}).", "",
        "## Training", "",
        f"{len(runs)} run{'s' if len(runs) > 1 else ''}, {total_s / 60:.0f} min of training in all (evaluation not counted):", "",
    ]
    for i, run in enumerate(runs, 1):
        src = f" (from `{run['init_from']['path']}`, sha256 {run['init_from']['sha256'][:12]}…)" if run.get("init_from") else ""
        out += [f"{i}. on {run.get('hardware') or 'unknown hardware'}, {run['wall_time_s'] / 60:.0f} min{src}:", "",
                "   ```", f"   {run['command']}", "   ```", ""]
    out += ["| run | epoch | input px | train loss | train acc | test loss | test acc | img/s | min |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, run in enumerate(runs, 1):
        for m in run.get("metrics") or ([run["last_epoch"]] if run.get("last_epoch") else []):
            cells = [_cell(m.get(k), k) for k in ("epoch", "image_size", "train_loss", "train_acc", "test_loss", "test_acc", "img_per_s")]
            out.append(f"| {i} | " + " | ".join(cells) + f" | {float(m.get('epoch_seconds', 0)) / 60:.1f} |")
    out += ["", "Test accuracy is measured at each epoch's own input size.", "", "## Per class", "",
            "| class | accuracy |", "|---|---|"]
    out += [f"| {k} | {v:.3f} |" for k, v in card["per_class_accuracy"].items()]
    out += ["", "Confusion matrix: `confusion.png`.", "", "## Variants", "",
            "| variant | test accuracy | CPU ms/img, batch 1 | batch 32 | shipped |", "|---|---|---|---|---|"]
    for name, v in card["variants"].items():
        t = v.get("cpu_ms_per_image", {})
        kept = "yes" if v["passed"] else f"no: {v['gate']}"
        out.append(f"| {name} (`{v['file']}`) | {v['accuracy']:.4f} | {t.get('batch_1', '-')} | {t.get('batch_32', '-')} | {kept} |")
    out += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    out += [f"| {name} | {f['bytes']:,} | `{f['sha256']}` |" for name, f in card["files"].items()]
    out += [f"| checkpoint {card['checkpoint']} | | `{card['checkpoint_sha256']}` |", "",
            "Exported with " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + f", ONNX opset {card['opset']}.", ""]
    return "\n".join(out)
