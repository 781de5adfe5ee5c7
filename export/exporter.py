"""Checkpoint -> checked ONNX model, optimized variants and a model card, written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from export.card import card_markdown, metadata_from_card, versions
from export.checks import CheckFailed, accuracy, accuracy_gate, assert_parity, parity
from export.onnx_io import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx, write_metadata
from export.variants import convert_fp16, cpu_session, cuda_session, ms_per_image, quantize_int8, run_batched
from serving.imaging import as_uploads, normalize
from serving.model_files import CARD, VARIANT_FILES, sha256 as sha256_file
from training.checkpoint import load_checkpoint, model_from_checkpoint, training_summary
from training.data import find_data_root, load_split
from training.plots import plot_confusion

log = logging.getLogger("export")

FP32, INT8, FP16 = (VARIANT_FILES[v] for v in ("fp32", "int8", "fp16"))
SHAPE_BATCHES = (1, 2, 7, 64)


@dataclass
class ExportOptions:
    data_dir: str | None = None
    limit: int | None = None  # test images for parity and accuracy (None: all 10,000)
    int8: bool = True
    fp16: bool = True
    calibration_images: int = 512
    register: bool = True
    name: str = "nin-fashion-mnist"
    timing: bool = True
    hardware: str | None = None  # where the checkpoint was trained, if it does not record it
    report: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.report.append(line)
        print(line, flush=True)


def _preprocess(images_u8: torch.Tensor, config) -> np.ndarray:
    """28x28 uint8 -> the server's input for the same images uploaded as 224x224 PNGs (PIL resize,
    then the server's normalize), so the card's accuracy is what `bentoml serve` scores. Training
    resizes with torch on its device, which differs from PIL by at most one grey level in some
    pixels, enough to change some predictions (docs/decisions.md)."""
    contract = config.input_contract()
    return normalize(as_uploads(images_u8.numpy(), contract["image_size"]), contract)


def _logits_over(images_u8: torch.Tensor, config, fns: dict, chunk: int = 250) -> dict[str, np.ndarray]:
    """Run every model in `fns` on the same preprocessed chunks (10k images at 224x224 would be
    2 GB as one float array)."""
    out = {k: [] for k in fns}
    for i in range(0, len(images_u8), chunk):
        x = _preprocess(images_u8[i : i + chunk], config)
        for k, fn in fns.items():
            out[k].append(fn(x))
    return {k: np.concatenate(v) for k, v in out.items()}


def _confusion(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(labels * k + logits.argmax(1), minlength=k * k).reshape(k, k)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Swap `tmp` in as `dest`; an existing `dest` is kept until the new one is in place."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, opts: ExportOptions | None = None) -> dict:
    opts = opts or ExportOptions()
    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = load_checkpoint(checkpoint)
    model, config = model_from_checkpoint(ckpt)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        card = _export_into(tmp, checkpoint, ckpt, model, config, opts)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if opts.register:
        from serving.model_files import import_to_store

        card["bentoml_tag"] = import_to_store(out, opts.name)
        opts.say(f"registered in the BentoML model store as {card['bentoml_tag']}")
    return card


def _export_into(tmp: Path, checkpoint: Path, ckpt: dict, model, config, opts: ExportOptions) -> dict:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = tmp / FP32
    export_onnx(model, fp32, config.image_size, config.in_channels)
    onnx.checker.check_model(str(fp32), full_check=True)
    opts.say(f"onnx.checker full check: ok (opset {OPSET})")
    session = cpu_session(fp32)
    for b in SHAPE_BATCHES:
        x = np.zeros((b, config.in_channels, config.image_size, config.image_size), np.float32)
        shape = session.run(None, {INPUT_NAME: x})[0].shape
        if shape != (b, config.num_classes):
            raise CheckFailed(f"shape check: batch {b} gave output {shape}, expected {(b, config.num_classes)}")
    opts.say(f"output shapes: ok for batch sizes {', '.join(map(str, SHAPE_BATCHES))} -> (N, {config.num_classes})")

    root = find_data_root(opts.data_dir)
    test_x, test_y = load_split(root, train=False)
    if opts.limit:
        test_x, test_y = test_x[: opts.limit], test_y[: opts.limit]
    labels = test_y.numpy()

    variants = {}
    if opts.int8:
        train_x, _ = load_split(root, train=True)
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: opts.calibration_images]
        quantize_int8(fp32, tmp / INT8, _preprocess(train_x[pick], config))
        variants["int8"] = tmp / INT8
    if opts.fp16:
        convert_fp16(fp32, tmp / FP16)
        variants["fp16"] = tmp / FP16

    sessions = {"onnx-fp32": session, **{k: cpu_session(p) for k, p in variants.items()}}
    # fp16 is meant for GPUs: where the CUDA provider runs, its gate runs there too.
    on_cuda = {}
    if "fp16" in variants and (s := cuda_session(variants["fp16"])) is not None:
        on_cuda["fp16"] = s
    with torch.no_grad():
        fns = {"torch-fp32": lambda x: model(torch.from_numpy(x)).numpy()}
        fns.update({k: (lambda x, s=s: run_batched(s, x)) for k, s in sessions.items()})
        fns.update({f"{k}-cuda": (lambda x, s=s: run_batched(s, x)) for k, s in on_cuda.items()})
        logits = _logits_over(test_x, config, fns)

    par = parity(logits["torch-fp32"], logits["onnx-fp32"], labels)
    opts.say(f"parity on {par['images']:,} real test images: max |dlogit| {par['max_abs_diff']:.2e}, "
             f"mean {par['mean_abs_diff']:.2e}, argmax agreement {par['argmax_agreement']:.2%}, "
             f"accuracy torch {par['reference_accuracy']:.4f} / onnx {par['candidate_accuracy']:.4f}")
    assert_parity(par)
    base_acc = par["candidate_accuracy"]
    confusion = _confusion(logits["onnx-fp32"], labels, config.num_classes)
    per_class = (confusion.diagonal() / np.maximum(confusion.sum(1), 1)).tolist()

    variant_reports = {"fp32": {"file": FP32, "accuracy": base_acc, "passed": True, "gate": "reference"}}
    for k, path in variants.items():
        acc = {"CPUExecutionProvider": accuracy(logits[k], labels)}
        if k in on_cuda:
            acc["CUDAExecutionProvider"] = accuracy(logits[f"{k}-cuda"], labels)
        gates = {prov: accuracy_gate(base_acc, a) for prov, a in acc.items()}
        ok = all(g[0] for g in gates.values())
        why = "; ".join(f"{prov.removesuffix('ExecutionProvider')}: {g[1]}" for prov, g in gates.items())
        variant_reports[k] = {"file": path.name, "accuracy": acc["CPUExecutionProvider"], "passed": ok, "gate": why,
                              "checked_on": list(acc), "accuracy_by_provider": acc}
        if k == "fp16" and k not in on_cuda:
            opts.say("fp16: gated on the CPU provider only (no CUDA device here); a GPU server serves fp32 "
                     "until an export on a GPU machine checks fp16 there")
        opts.say(f"{k}: {'kept' if ok else 'NOT written'}: {why}")
        if not ok:
            sessions.pop(k)
            path.unlink()
    if opts.timing:
        sample = _preprocess(test_x[:32], config)
        for k, s in sessions.items():
            name = "fp32" if k == "onnx-fp32" else k
            variant_reports[name]["cpu_ms_per_image"] = {
                "batch_1": round(ms_per_image(s, sample, 1), 2), "batch_32": round(ms_per_image(s, sample, 32), 2)}
        opts.say("variant  accuracy  CPU ms/img b1  b32")
        for name, r in variant_reports.items():
            t = r.get("cpu_ms_per_image", {})
            if r["passed"]:
                opts.say(f"{name:<8} {r['accuracy']:.4f}    {t.get('batch_1', float('nan')):>8.2f} {t.get('batch_32', float('nan')):>6.2f}")

    card = {
        "name": opts.name,
        "class_names": list(config.class_names),
        "input_contract": config.input_contract(),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "model_config": config.to_dict(),
        "test_accuracy": base_acc,
        "test_images": int(len(labels)),
        "per_class_accuracy": dict(zip(config.class_names, per_class)),
        "confusion_matrix": confusion.tolist(),
        "training": training_summary(ckpt, opts.hardware),
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "opset": OPSET,
        "versions": versions(),
        "checks": {"onnx_checker_full": True, "output_shapes_for_batches": list(SHAPE_BATCHES), "parity": par},
        "variants": variant_reports,
    }
    meta = metadata_from_card(card)
    files = {}
    for name, r in variant_reports.items():
        if r["passed"]:
            path = tmp / r["file"]
            m = onnx.load(str(path))
            write_metadata(m, {**meta, "provenance": {**meta["provenance"], "variant": name}})
            onnx.save(m, str(path))
            files[r["file"]] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "variant": name}
    card["files"] = files
    plot_confusion(confusion, config.class_names, tmp / "confusion.png",
                   title=f"ONNX fp32: test accuracy {base_acc:.4f} on {len(labels):,} images")
    (tmp / CARD).write_text(json.dumps(card, indent=1))
    (tmp / "card.md").write_text(card_markdown(card))
    (tmp / "report.txt").write_text("\n".join(opts.report) + "\n")
    return card
