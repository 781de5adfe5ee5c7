"""`python -m training`: train NiN on Fashion-MNIST (also under torchrun for several GPUs)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import signal
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from training.checkpoint import atomic_write, load_checkpoint, load_weights, parent_record, save_checkpoint, write_json
from training.config import MIN_IMAGE_SIZE, NiNConfig
from training.data import DataNotFoundError, find_data_root, load_split
from training.engine import NonFiniteLossError, evaluate, per_class_accuracy, train_one_epoch
from training.model import NiN, init_weights
from training.plots import plot_curves
from training.presets import PRESETS
from training.runtime import Runtime, hardware_name, make_runtime, peak_memory_mb

log = logging.getLogger("training")

# Flags a --resume may change; every other argument comes from the checkpoint.
RUNTIME_ARGS = {
    "device", "amp", "channels_last", "compile", "data_dir", "out", "resume", "max_steps",
    "eval_limit", "checkpoint_every", "lr_find", "lr_find_steps", "target_acc",
}
# Of those, the ones that change the arithmetic default to None, "not named": a resume keeps the
# run's value unless the command names one (so a resume cannot silently change the number format). Their defaults:
KEPT_ON_RESUME = {"amp": "auto", "channels_last": "auto", "compile": False}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train NiN (d2l 8.3) on Fashion-MNIST at 224x224.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="strong", help="training recipe (default: strong)")
    p.add_argument("--out", default="runs/nin", help="run folder for checkpoints and metrics (default: runs/nin)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files (default: search)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: auto (cuda if present)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=None,
                   help="autocast dtype (default: auto = bf16 where the hardware has it; a resume keeps the run's)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default=None,
                   help="default: auto (on); a resume keeps the run's")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (default: off)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights (fine-tuning; new optimizer and schedule)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (smoke runs)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="also write last.pt every N steps within an epoch (default: 100)")
    p.add_argument("--target-acc", type=float, default=None,
                   help="stop after the first full-size epoch whose test accuracy reaches this (default: off)")
    p.add_argument("--lr-find", action="store_true", help="run a learning-rate range test instead of training")
    p.add_argument("--lr-find-steps", type=int, default=100, help="steps of the range test (default: 100)")
    # Recipe; None means "the preset's value".
    g = p.add_argument_group("recipe (defaults come from --preset)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--optimizer", choices=["sgd", "adamw"])
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=["constant", "onecycle", "cosine"])
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up before cosine")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, help="pad-2 random crop + h-flip")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction)
    g.add_argument("--init", choices=["xavier", "kaiming", "default"])
    g.add_argument("--dropout", type=float)
    g.add_argument("--low-res-epochs", type=int, default=0,
                   help="progressive resizing: train the first K epochs at --low-res-size (default: 0)")
    g.add_argument("--low-res-size", type=int, default=112,
                   help="input size of the low-resolution epochs (default: 112; a quarter of 224's pixels)")
    g.add_argument("--num-1x1", type=int, default=2, help="1x1 convs per block, 0-3 (default: 2)")
    g.add_argument("--width", type=float, default=1.0, help="width multiplier (default: 1.0)")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every recipe value the command line left as None from the preset."""
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("epochs", "batch_size", "lr_find_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError(f"--max-steps must be positive, got {args.max_steps}")
    if args.target_acc is not None and not 0 < args.target_acc <= 1:
        raise ValueError(f"--target-acc must be in (0, 1], got {args.target_acc}")
    if args.low_res_epochs and args.low_res_size < MIN_IMAGE_SIZE:
        raise ValueError(f"--low-res-size must be at least {MIN_IMAGE_SIZE} (NiN's smallest input), got {args.low_res_size}")
    return args


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm parameters (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    return torch.optim.AdamW(groups, lr=args.lr)


def build_scheduler(optimizer, args, steps_per_epoch: int):
    total = args.epochs * steps_per_epoch
    if args.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=0.25)
    if args.schedule == "cosine":
        warm = int(args.warmup_epochs * steps_per_epoch)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warm))
        if warm == 0:
            return cos
        lin = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warm)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [lin, cos], milestones=[warm])
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def epoch_batches(n: int, args, rt: Runtime, epoch: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """This rank's shuffled batches for `epoch`, as index tensors on `device` (where the data
    lives); the same for a given seed, so a resumed run can skip exactly the batches already
    trained."""
    sampler = DistributedSampler(range(n), num_replicas=rt.world_size, rank=rt.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), device=device)  # one copy per epoch, not one per step
    usable = len(idx) // args.batch_size * args.batch_size
    return list(idx[:usable].split(args.batch_size))


def write_metrics(out: Path, metrics: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for m in metrics for k in m)))  # rows of older runs lack columns
    w.writeheader()
    w.writerows(metrics)
    atomic_write(out / "metrics.csv", lambda tmp: tmp.write_text(buf.getvalue()))
    plot_curves(metrics, out / "curves.png")


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


def main(args: argparse.Namespace) -> int:
    args = resolve_args(args)
    out = Path(args.out)
    ckpt = load_checkpoint(out / "last.pt") if args.resume else None
    if ckpt is not None:
        for k, v in ckpt["args"].items():
            if k not in RUNTIME_ARGS or (k in KEPT_ON_RESUME and getattr(args, k) is None):
                setattr(args, k, v)
    for k, default in KEPT_ON_RESUME.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    rt = make_runtime(args.device, args.amp, args.channels_last)
    torch.manual_seed(args.seed)
    config = NiNConfig(batch_norm=args.batch_norm, dropout=args.dropout, num_1x1=args.num_1x1, width=args.width)
    if ckpt is not None and NiNConfig.from_dict(ckpt["model_config"]) != config:
        raise ValueError("the checkpoint's model config differs from the one asked for")

    root = find_data_root(args.data_dir)
    train_x, train_y = (t.to(rt.device) for t in load_split(root, train=True))
    test_x, test_y = (t.to(rt.device) for t in load_split(root, train=False))
    if args.eval_limit:
        test_x, test_y = test_x[: args.eval_limit], test_y[: args.eval_limit]

    model = NiN(config)
    init_weights(model, args.init)
    if args.init_from and ckpt is None:
        source = load_checkpoint(args.init_from)
        if NiNConfig.from_dict(source["model_config"]) != config:
            raise ValueError(f"--init-from {args.init_from}: its model config differs from this run's")
        load_weights(model, source["model"], args.init_from)
        log.info("weights from %s", args.init_from)
    model = rt.place(model)
    if args.lr_find:
        from training.lr_find import run_lr_find

        return run_lr_find(model, train_x, train_y, config, rt, args, out)
    optimizer = build_optimizer(model, args)
    steps_per_epoch = len(epoch_batches(len(train_x), args, rt, 0))
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    metrics, start_epoch, skip = [], 0, 0
    if ckpt is not None:
        load_weights(model, ckpt["model"], "the checkpoint to resume")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        metrics, start_epoch, skip = ckpt["metrics"], ckpt["epoch"], ckpt["batch_in_epoch"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if rt.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], rt.device)
        log.info("resumed from %s at epoch %d, batch %d", out / "last.pt", start_epoch + 1, skip)
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "args.json", {"args": vars(args), "model_config": config.to_dict(), "device": str(rt.device),
                                       "amp": str(rt.amp_dtype), "channels_last": rt.channels_last,
                                       "world_size": rt.world_size}, indent=2)
        log.info("device %s, autocast %s, channels_last %s, %d process(es), %d steps/epoch",
                 rt.device, rt.amp_dtype, rt.channels_last, rt.world_size, steps_per_epoch)

    def checkpoint(epoch: int, batch_in_epoch: int) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if rt.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(rt.device)
        return {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "model_config": config.to_dict(), "args": vars(args), "metrics": metrics, "rng": rng,
            "runtime": runtime_info,
        }

    runtime_info = {"device": str(rt.device), "hardware": hardware_name(rt.device), "world_size": rt.world_size,
                    "command": " ".join(["python -m training", *sys.argv[1:]])}
    if args.init_from:  # the record of the run this one starts from travels in every checkpoint
        parent = ((ckpt or {}).get("runtime") or {}).get("parent")
        if parent is None and Path(args.init_from).is_file():
            parent = parent_record(args.init_from)
        if parent is not None:
            runtime_info["parent"] = parent
    stop, steps_left = StopFlag(), args.max_steps
    best = max((m["test_acc"] for m in metrics if m["image_size"] == config.image_size), default=-1.0)
    for epoch in range(start_epoch, args.epochs):
        batches = epoch_batches(len(train_x), args, rt, epoch, train_x.device)[skip:]
        size = args.low_res_size if epoch < args.low_res_epochs else config.image_size
        if steps_left is not None:
            batches = batches[:steps_left]

        def on_step(done: int, epoch=epoch, first=skip) -> None:
            if rt.is_main and args.checkpoint_every and done % args.checkpoint_every == 0:
                save_checkpoint(checkpoint(epoch, first + done), out / "last.pt")
                log.info("epoch %d, batch %d/%d: saved %s", epoch + 1, first + done, steps_per_epoch, out / "last.pt")

        try:
            tr = train_one_epoch(model, optimizer, scheduler, train_x, train_y, batches, config, rt,
                                 augment=args.augment, label_smoothing=args.label_smoothing,
                                 image_size=size, should_stop=stop, on_step=on_step,
                                 desc=f"epoch {epoch + 1}/{args.epochs} @{size}px")
        except NonFiniteLossError as e:
            log.error("stopped: %s (last.pt keeps the last good state)", e)
            return 3
        done_in_epoch = skip + tr["batches"]
        skip = 0
        if steps_left is not None:
            steps_left -= tr["batches"]
        if stop() or (done_in_epoch < steps_per_epoch and steps_left != 0):
            if rt.is_main:
                save_checkpoint(checkpoint(epoch, done_in_epoch), out / "last.pt")
                log.warning("interrupted by signal %s at epoch %d, batch %d: saved %s; continue with --resume",
                            stop.signum, epoch + 1, done_in_epoch, out / "last.pt")
            return 128 + (stop.signum or 0)
        ev = evaluate(model, test_x, test_y, config, rt, image_size=size)
        finished_epoch = done_in_epoch == steps_per_epoch
        row = {
            "epoch": epoch + 1 if finished_epoch else round(epoch + done_in_epoch / steps_per_epoch, 3),
            "train_loss": round(tr["loss_sum"] / max(tr["n"], 1), 5),
            "train_acc": round(tr["correct"] / max(tr["n"], 1), 5),
            "image_size": size, "test_loss": round(ev["loss"], 5), "test_acc": round(ev["acc"], 5), "test_images": ev["n"],
            "lr": scheduler.get_last_lr()[0], "img_per_s": round(tr["n"] / max(tr["seconds"], 1e-9), 1),
            "epoch_seconds": round(tr["seconds"], 1), "peak_mem_mb": round(peak_memory_mb(rt.device), 1),
            "per_class_acc": json.dumps([round(a, 4) for a in per_class_accuracy(ev["confusion"])]),
            "hardware": runtime_info["hardware"], "amp": str(rt.amp_dtype).removeprefix("torch."),
        }
        metrics.append(row)
        if rt.is_main:
            log.info("epoch %s: train loss %.4f acc %.4f | test loss %.4f acc %.4f (%d images) | %.0f img/s",
                     row["epoch"], row["train_loss"], row["train_acc"], row["test_loss"], row["test_acc"],
                     ev["n"], row["img_per_s"])
            state = checkpoint(epoch + 1 if finished_epoch else epoch, 0 if finished_epoch else done_in_epoch)
            save_checkpoint(state, out / "last.pt")
            if size == config.image_size and row["test_acc"] > best:  # low-res epochs don't count
                best = row["test_acc"]
                save_checkpoint(state, out / "best.pt")
            write_metrics(out, metrics)
        if args.target_acc is not None and size == config.image_size and row["test_acc"] >= args.target_acc:
            if rt.is_main:
                log.info("test accuracy %.4f reached --target-acc %s after epoch %s: stopping",
                         row["test_acc"], args.target_acc, row["epoch"])
            break
        if steps_left == 0:
            break
    return 0


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (DataNotFoundError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
