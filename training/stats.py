"""`python -m training.stats`: NiN's shapes, parameters, FLOPs and memory, predicted and measured.

Measured figures:
- multiply-adds: torch.utils.flop_counter over one forward pass (FLOPs / 2);
- saved activations: bytes of every tensor autograd packs for the backward pass
  (torch.autograd.graph.saved_tensors_hooks, parameters excluded, each storage counted once);
- training / prediction memory: on CUDA, torch.cuda.max_memory_allocated over one step minus
  what was allocated before; on the CPU, the growth of the process's peak resident set
  (VmHWM, reset through /proc/self/clear_refs) over one step, which also holds the allocator's
  slack and oneDNN's scratch buffers.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from training.config import NiNConfig
from training.model import NiN
from training.resources import OPTIMIZER_STATES, report
from training.runtime import read_status_kb, reset_peak_rss, select_device


def measured_macs(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total multiply-adds and those of each leaf module, by torch's flop counter."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    per_module = {name: sum(counts.values()) // 2 for name, counts in counter.get_flop_counts().items()}
    return counter.get_total_flops() // 2, per_module


def measured_saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def _peak_growth(fn, device: torch.device) -> int | None:
    """Bytes by which peak memory grows while fn() runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not reset_peak_rss():
        return None
    before = read_status_kb("VmRSS")
    fn()
    return (read_status_kb("VmHWM") - before) * 1024


def measure(config: NiNConfig, batch_size: int, optimizer: str, device: torch.device, image_size: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch_size, config.in_channels, image_size, image_size)
    total, per_module = measured_macs(NiN(config).eval(), x)
    saved = measured_saved_bytes(NiN(config), x)
    y = torch.randint(0, config.num_classes, (batch_size,))

    # Weights, input and label live on the device first; each measurement adds to that.
    model = NiN(config).to(device)
    xd, yd = x.to(device), y.to(device)

    def predict():
        with torch.no_grad():
            model.eval()(xd)

    prediction = _peak_growth(predict, device)
    momentum = OPTIMIZER_STATES[optimizer] == 1
    opt = (torch.optim.AdamW(model.parameters()) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9 if momentum else 0.0))

    def step():
        loss = F.cross_entropy(model.train()(xd), yd)
        loss.backward()
        opt.step()  # allocates the optimizer state on the first step

    training = _peak_growth(step, device)
    return {
        "device": str(device),
        "method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS growth (VmHWM)",
        "total_macs": total,
        "per_module_macs": per_module,
        "saved_activations": saved,
        "prediction_bytes": prediction,
        "training_step_bytes": training,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MB"


def format_table(rep: dict) -> str:
    lines = [f"NiN at batch {rep['batch_size']}, input {rep['config']['in_channels']}x{rep['image_size']}x{rep['image_size']}", ""]
    head = f"{'layer':<12}{'type':<18}{'output (C,H,W)':<18}{'params':>10}{'MACs':>14}{'act. MB':>9}  floor / unvisited edge"
    lines += [head, "-" * len(head)]
    for r in rep["layers"]:
        note = ""
        if r["floor"]:
            note = r["floor"] + (f"; last {r['unvisited']} row/col never visited" if r["unvisited"] else "")
        shape = "x".join(map(str, r["output_shape"]))
        lines.append(f"{r['name']:<12}{r['layer']:<18}{shape:<18}{r['params']:>10,}{r['macs']:>14,}"
                     f"{r['activation_bytes'] / 2**20:>9.2f}  {note}")
    lines += ["-" * len(head), f"total parameters {rep['total_params']:,}; multiply-adds {rep['total_macs']:,} "
              f"({2 * rep['total_macs'] / 1e9:.2f} GFLOP)"]
    mem = rep["memory"]
    t, p = mem["training"], mem["prediction"]
    lines += ["", f"memory, predicted (fp32, optimizer {mem['optimizer']}):",
              f"  training:   weights {_mb(t['weights'])} + gradients {_mb(t['gradients'])} + optimizer "
              f"{_mb(t['optimizer_state'])} + saved activations {_mb(t['saved_activations'])} = {_mb(t['total'])}",
              f"  prediction: weights {_mb(p['weights'])} + largest input/output pair "
              f"{_mb(p['largest_activation_pair'])} = {_mb(p['total'])}"]
    m = rep.get("measured")
    if m:
        lines += ["", f"measured on {m['device']} ({m['method']}):",
                  f"  multiply-adds       {m['total_macs']:,} (flop counter)  vs predicted {rep['total_macs']:,}",
                  f"  saved activations   {_mb(m['saved_activations'])} (autograd)  vs predicted {_mb(t['saved_activations'])}",
                  f"  one training step   {_mb(m['training_step_bytes'])} on top of weights  vs predicted "
                  f"{_mb(t['total'] - t['weights'])}",
                  f"  one prediction      {_mb(m['prediction_bytes'])} on top of weights  vs predicted "
                  f"{_mb(p['largest_activation_pair'])}"]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="NiN shapes, parameters, FLOPs and memory, predicted and measured.")
    p.add_argument("--batch-size", type=int, default=1, help="default: 1")
    p.add_argument("--image-size", type=int, default=224, help="default: 224")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATES), default="sgd-momentum", help="default: sgd-momentum")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to measure (default: auto)")
    p.add_argument("--no-measure", action="store_true", help="predictions only, no forward pass")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--batch-norm", action="store_true", help="BatchNorm after each conv (default: off, as d2l)")
    p.add_argument("--num-1x1", type=int, default=2, help="1x1 convs per block, 0-3 (default: 2)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (default: 1.0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
        config = NiNConfig(batch_norm=args.batch_norm, num_1x1=args.num_1x1, width=args.width)
        rep = report(config, args.batch_size, args.optimizer, args.image_size)
        if not args.no_measure:
            rep["measured"] = measure(config, args.batch_size, args.optimizer, select_device(args.device), args.image_size)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1) if args.json else format_table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
