"""`python -m training.profile`: where a training step's time goes, and whether it waits on the host.

Runs the real training loop (`train_one_epoch`, the strong preset's optimizer and schedule) on
random uint8 images kept on the device, as a run keeps Fashion-MNIST, under torch.profiler, and
reports images/s, how busy the device was, and every host-device synchronisation and copy: on a
GPU a step that copies indices or random numbers from the host, or reads a value back, stalls
the queue of kernels; here the only reads are the progress bar's, one every `sync_every` steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from training.config import MIN_IMAGE_SIZE, NiNConfig
from training.engine import train_one_epoch
from training.model import build_model
from training.runtime import Runtime, hardware_name, make_runtime, peak_memory_mb

# CUDA runtime calls that block the host until the device catches up.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def summarize(events, steps: int, seconds: float) -> dict:
    """Counts of synchronising calls and copies, and device busy time, from profiler events."""
    names = Counter(e.name for e in events)
    syncs = {n: names[n] for n in SYNC_CALLS if names[n]}
    copies = {n: c for n, c in names.items() if n.startswith("Memcpy") or n.startswith("Memset")}
    busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {
        "steps": steps,
        "seconds": round(seconds, 3),
        "host_syncs": syncs,
        "host_syncs_per_step": round(sum(syncs.values()) / max(steps, 1), 3),
        "device_copies": copies,
        "device_busy_share": round(busy_us / 1e6 / seconds, 3) if busy_us else None,
    }


def run_profile(rt: Runtime, batch_size: int, steps: int, image_size: int = 224, warmup: int = 5,
                sync_every: int = 20, width: float = 1.0, seed: int = 0) -> tuple[dict, str]:
    """Profile `steps` training steps after `warmup` unprofiled ones; returns (summary, op table)."""
    from training.presets import PRESETS
    from training.train import build_optimizer, build_scheduler

    preset = argparse.Namespace(**PRESETS["strong"])
    config = NiNConfig(batch_norm=True, width=width)
    model = build_model(config, preset.init, seed, rt)
    optimizer = build_optimizer(model, preset)
    scheduler = build_scheduler(optimizer, preset, steps_per_epoch=warmup + steps)
    n = batch_size * (warmup + steps)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, device=rt.device)
    labels = torch.randint(0, config.num_classes, (n,), device=rt.device)
    batches = list(torch.randperm(n, device=rt.device).split(batch_size))
    kw = dict(augment=True, label_smoothing=preset.label_smoothing, image_size=image_size,
              should_stop=lambda: False, sync_every=sync_every)
    train_one_epoch(model, optimizer, scheduler, images, labels, batches[:warmup], config, rt, desc="warm-up", **kw)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        train_one_epoch(model, optimizer, scheduler, images, labels, batches[warmup:], config, rt, desc="profiled", **kw)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    summary = summarize(prof.events(), steps, seconds)
    summary.update({
        "device": str(rt.device), "hardware": hardware_name(rt.device), "torch": torch.__version__,
        "batch_size": batch_size, "image_size": image_size, "amp": str(rt.amp_dtype),
        "channels_last": rt.channels_last, "img_per_s": round(steps * batch_size / seconds, 1),
        "ms_per_step": round(seconds / steps * 1000, 2), "peak_mem_mb": round(peak_memory_mb(rt.device), 1),
    })
    sort = "self_device_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    return summary, table


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Profile NiN training steps: img/s, device busy share, host syncs.")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="default: auto")
    p.add_argument("--batch-size", type=int, default=128, help="default: 128")
    p.add_argument("--steps", type=int, default=468, help="profiled steps (default: 468, one epoch at 128)")
    p.add_argument("--warmup", type=int, default=5, help="unprofiled steps first (default: 5)")
    p.add_argument("--image-size", type=int, default=224, help="default: 224")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (default: 1.0)")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        for name in ("batch_size", "steps"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if args.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"--image-size must be at least {MIN_IMAGE_SIZE} (NiN's smallest input), got {args.image_size}")
        rt = make_runtime(args.device, args.amp, "auto")
        summary, table = run_profile(rt, args.batch_size, args.steps, args.image_size, args.warmup, width=args.width)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(json.dumps(summary, indent=1))
    if args.json:
        from training.checkpoint import write_json

        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
