"""`python -m training.evaluate CKPT`: test accuracy, per-class accuracy, confusion matrix.

Runs in fp32 by default (what the exported model computes); writes eval.json and
confusion.png next to the checkpoint unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.checkpoint import load_checkpoint, model_from_checkpoint, write_json
from training.data import DataNotFoundError, find_data_root, load_split
from training.engine import evaluate, per_class_accuracy
from training.plots import plot_confusion
from training.runtime import make_runtime


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a NiN checkpoint on the Fashion-MNIST test set.")
    p.add_argument("checkpoint", help="path to a .pt checkpoint written by `python -m training`")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files (default: search)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: auto")
    p.add_argument("--amp", choices=["off", "bf16", "fp16", "auto"], default="off", help="default: off (fp32)")
    p.add_argument("--limit", type=int, default=None, help="first N test images only (default: all 10,000)")
    p.add_argument("--out", default=None, help="folder for eval.json and confusion.png (default: the checkpoint's)")
    return p


def run(args: argparse.Namespace) -> dict:
    ckpt = load_checkpoint(args.checkpoint)
    model, config = model_from_checkpoint(ckpt)
    rt = make_runtime(args.device, args.amp, "auto")
    images, labels = load_split(find_data_root(args.data_dir), train=False)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    model = model.to(rt.device)
    ev = evaluate(model, images.to(rt.device), labels.to(rt.device), config, rt)
    result = {
        "checkpoint": str(args.checkpoint),
        "test_images": ev["n"],
        "test_accuracy": ev["acc"],
        "test_loss": ev["loss"],
        "per_class_accuracy": dict(zip(config.class_names, per_class_accuracy(ev["confusion"]))),
        "confusion_matrix": ev["confusion"].tolist(),
        "device": str(rt.device),
        "amp": str(rt.amp_dtype),
    }
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    write_json(out / "eval.json", result)
    plot_confusion(ev["confusion"].numpy(), config.class_names, out / "confusion.png",
                   title=f"test accuracy {ev['acc']:.4f} on {ev['n']:,} images")
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        r = run(args)
    except (DataNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"test accuracy {r['test_accuracy']:.4f} on {r['test_images']:,} images")
    for name, acc in r["per_class_accuracy"].items():
        print(f"  {name:<12} {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
