"""One arm of the grid, trained and measured in this process (the CLI gives each arm its own
child process, so the peak memory it reports is that arm's alone)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from training.checkpoint import write_json
from training.config import NiNConfig
from training.engine import NonFiniteLossError, evaluate, train_one_epoch
from training.experiments.grid import LN10, Arm, Budget
from training.model import build_model
from training.presets import PRESETS
from training.resources import report as resource_report
from training.runtime import Runtime, hardware_name, peak_memory_mb

log = logging.getLogger(__name__)


def recipe_args(preset: str, lr: float, epochs: int, budget: Budget, seed: int | None = None,
                **overrides) -> SimpleNamespace:
    """The preset's recipe with this arm's lr, epochs and training seed (default: the budget's)
    and the budget's batch size: the same namespace training.train's optimizer, scheduler and
    range test read."""
    values = dict(PRESETS[preset], lr=lr, epochs=epochs, batch_size=budget.batch_size,
                  seed=budget.seed if seed is None else seed, lr_find_steps=budget.range_steps, **overrides)
    return SimpleNamespace(**values)


def model_config(arm: Arm, budget: Budget, args: SimpleNamespace) -> NiNConfig:
    return NiNConfig(num_1x1=arm.num_1x1, head_width=arm.head_width, batch_norm=args.batch_norm,
                     dropout=args.dropout, image_size=budget.image_size)


def ort_session(model: torch.nn.Module, config: NiNConfig):
    """An onnxruntime CPU session of this model's own ONNX export, and a batch-1 input for it."""
    from export.onnx_io import export_onnx
    from export.variants import cpu_session

    model = model.float().cpu().to(memory_format=torch.contiguous_format).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "arm.onnx"
        export_onnx(model, path, image_size=config.image_size, in_channels=config.in_channels)
        session = cpu_session(path)
    x = np.random.default_rng(0).standard_normal((1, 1, config.image_size, config.image_size), dtype=np.float32)
    return session, {session.get_inputs()[0].name: x}


def timed_runs(session, feed: dict, n: int) -> list[float]:
    """n batch-1 runs, each in ms."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def ort_ms_per_image(model: torch.nn.Module, config: NiNConfig, runs: int) -> float | None:
    """Median onnxruntime CPU latency of one image, from this arm's own ONNX export."""
    if runs <= 0:
        return None
    session, feed = ort_session(model, config)
    timed_runs(session, feed, max(3, runs // 10))  # warm-up
    return round(float(np.median(timed_runs(session, feed, runs))), 3)


@torch.no_grad()
def logit_stats(model: torch.nn.Module, images: torch.Tensor, config: NiNConfig, rt: Runtime, n: int = 1000) -> dict:
    """How alive the class scores are on the first `n` images: the mean spread (max - min) of an
    image's 10 scores, and the fraction of images whose scores are all exactly 0 (NiN ends in
    ReLU then average pooling). Spread near 0 means a uniform prediction: loss ln 10, and a
    gradient that barely reaches the early layers."""
    from training.data import to_model_input

    model.eval()
    logits = model(to_model_input(images[:n], config, rt.channels_last)).float()
    spread = (logits.max(dim=1).values - logits.min(dim=1).values).mean()
    return {"spread": float(f"{float(spread):.4g}"), "dead": round(float((logits == 0).all(dim=1).float().mean()), 4)}


def train_arm(arm: Arm, budget: Budget, data: dict, rt: Runtime) -> dict:
    """Train the arm for its epochs, evaluating on the test images after each one."""
    from training.train import build_optimizer, build_scheduler

    args = recipe_args(arm.preset, arm.lr, arm.epochs, budget, seed=arm.seed, **arm.overrides)
    config = model_config(arm, budget, args)
    model = build_model(config, args.init, args.seed, rt)  # also seeds the augmentation's draws
    optimizer = build_optimizer(model, args)
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    gen = torch.Generator().manual_seed(args.seed)
    n_batches = len(train_x) // args.batch_size
    scheduler = build_scheduler(optimizer, args, n_batches)
    cost = resource_report(config, batch_size=1)
    logits_at_init = logit_stats(model, test_x, config, rt)
    epochs, seconds, images, confusion, diverged = [], 0.0, 0, None, None
    for epoch in range(arm.epochs):
        order = torch.randperm(len(train_x), generator=gen)[: n_batches * args.batch_size]
        batches = list(order.to(train_x.device).split(args.batch_size))
        try:
            tr = train_one_epoch(model, optimizer, scheduler, train_x, train_y, batches, config, rt,
                                 augment=args.augment, label_smoothing=args.label_smoothing,
                                 should_stop=lambda: False, desc=f"{arm.name} {epoch + 1}/{arm.epochs}")
        except NonFiniteLossError as e:  # a result, not a crash: this lr is past the edge
            diverged = f"epoch {epoch + 1}: {e}"
            log.warning("%s diverged: %s", arm.name, e)
            break
        ev = evaluate(model, test_x, test_y, config, rt)
        seconds += tr["seconds"]
        images += int(tr["n"])
        confusion = ev["confusion"]
        epochs.append({"epoch": epoch + 1, "train_loss": round(tr["loss_sum"] / tr["n"], 4),
                       "train_acc": round(tr["correct"] / tr["n"], 4),
                       "test_loss": round(ev["loss"], 4), "test_acc": round(ev["acc"], 4)})
        log.info("%s epoch %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f", arm.name, epoch + 1,
                 *(epochs[-1][k] for k in ("train_loss", "train_acc", "test_loss", "test_acc")))
    return {
        "arm": arm.to_dict(), "budget": budget.name, "image_size": budget.image_size,
        "train_images": len(train_x), "test_images": len(test_x), "batch_size": args.batch_size,
        "seed": arm.seed, "data_seed": budget.seed, "recipe": {k: v for k, v in vars(args).items() if k != "lr_find_steps"},
        "params": cost["total_params"], "macs": cost["total_macs"],
        "memory_estimate_mb": {"training_b": round(resource_report(config, args.batch_size)["memory"]["training"]["total"] / 2**20, 1)},
        "epochs": epochs, "confusion": confusion.tolist() if confusion is not None else None,
        "diverged": diverged, "logits_init": logits_at_init,
        "logits_end": logit_stats(model, test_x, config, rt) if not diverged else None,
        # A stalled network predicts ~1/10 for everything: its loss sits at ln 10.
        "stalled": bool(epochs) and abs(epochs[-1]["train_loss"] - LN10) < 0.01,
        "img_per_s": round(images / max(seconds, 1e-9), 1), "peak_mem_mb": round(peak_memory_mb(rt.device), 1),
        "ort_cpu_ms_b1": ort_ms_per_image(model, config, budget.ort_runs) if not diverged else None,
        "hardware": hardware_name(rt.device), "device": str(rt.device),
    }


def range_test(recipe: str, budget: Budget, data: dict, rt: Runtime, out: Path) -> dict:
    """The learning-rate range test of training.lr_find on this budget's data and input size."""
    from training.lr_find import run_lr_find

    args = recipe_args(recipe, PRESETS[recipe]["lr"], 1, budget)
    arm = Arm(f"range-{recipe}", "lr", recipe, args.lr, 1)
    config = model_config(arm, budget, args)
    model = build_model(config, args.init, budget.seed, rt)
    logits = logit_stats(model, data["test"][0], config, rt)
    folder = out / f"range-{recipe}"
    run_lr_find(model, *data["train"], config, rt, args, folder)
    found = json.loads((folder / "lr_find.json").read_text())
    return {"recipe": recipe, "budget": budget.name, "suggested_lr": found["suggested_lr"],
            "lrs": found["lrs"], "losses": found["losses"], "logits_init": logits, "hardware": hardware_name(rt.device)}


def retime(folder: Path, budget: Budget, rounds: int = 10) -> int:
    """Re-measure every finished arm's onnxruntime CPU latency on this (quiet) machine.

    The latency depends on the architecture, not on the trained weights, so each architecture is
    exported once from a fresh model of its config and timed in alternating rounds (A B C ... A B
    C ..., `budget.ort_runs` runs each in all, 20 where it is 0), since a noisy machine drifts more
    in a minute than architectures differ (docs/decisions.md). Every arm of an architecture gets
    its median. Returns the number of arms updated."""
    runs = budget.ort_runs or 20  # a budget that times nothing while training (smoke) still gets a figure
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    arms: dict[str, list[tuple[Path, dict]]] = {}  # architecture -> its arms' files and records
    sessions: dict[str, tuple] = {}
    for f in sorted(folder.glob("*.json")):
        record = json.loads(f.read_text())
        if "arm" not in record or record.get("diverged"):
            continue
        arm = Arm(**record["arm"])
        args = recipe_args(arm.preset, arm.lr, arm.epochs, budget, **arm.overrides)
        config = model_config(arm, budget, args)
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in sessions:
            sessions[key] = ort_session(build_model(config, args.init, budget.seed, rt), config)
        arms.setdefault(key, []).append((f, record))
    per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for key, (session, feed) in sessions.items():
        timed_runs(session, feed, max(3, runs // 10))  # warm-up
    for _ in range(rounds):
        for key, (session, feed) in sessions.items():
            # let the last session's intra-op threads stop spinning first (docs/decisions.md)
            time.sleep(0.05)
            times[key] += timed_runs(session, feed, per_round)
    for key, found in arms.items():
        ms = round(float(np.median(times[key])), 3)
        for f, record in found:
            record["ort_cpu_ms_b1"], record["ort_retimed"] = ms, True
            write_json(f, record)
    return sum(len(found) for found in arms.values())
