"""What NiN costs, predicted from the layer hyper-parameters alone (no forward pass).

Output sizes use the floor: out = floor((in + 2p - k) / s) + 1. When (in + 2p - k) is not a
multiple of s, the last (in + 2p - k) mod s rows/columns at the bottom/right are never covered by
any window, so the layer ignores them.
"""

from __future__ import annotations

import math

from torch import nn

from training.config import NiNConfig
from training.model import NiN

FP32 = 4
INT64 = 8
BOOL = 1

# Layers whose backward needs their *input*; ReLU's backward needs its *output*.
SAVES_INPUT = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def window_rule(size: int, k: int, s: int, p: int) -> tuple[int, str, int]:
    """Output size, the formula with its floor written out, and how many input rows (or
    columns) at the far edge no window visits."""
    span = size + 2 * p - k
    if span < 0:
        raise ValueError(f"a {k}x{k} window does not fit a {size}x{size} input with padding {p}")
    out = span // s + 1
    exact = span / s + 1
    formula = f"({size} + 2*{p} - {k})/{s} + 1 = {exact:g}" + (f" -> {out}" if exact != out else "")
    return out, formula, span % s


def side(v) -> int:
    """A square window's kernel size, stride or padding: torch keeps a tuple for convolutions, an int for pools."""
    return v[0] if isinstance(v, tuple) else v


def layer_table(config: NiNConfig, batch_size: int = 1, image_size: int | None = None) -> list[dict]:
    """One row per leaf layer of NiN(config): name, output shape, floor, params, MACs, and the
    bytes of its output and of what autograd keeps of it for the backward pass."""
    size = image_size or config.image_size
    leaves = [(name, m) for name, m in NiN(config).named_modules() if not list(m.children())]
    shape = (config.in_channels, size, size)
    rows: list[dict] = []
    for i, (name, m) in enumerate(leaves):
        c, h, w = shape
        row = {"name": name, "layer": type(m).__name__, "input_shape": list(shape), "floor": None,
               "unvisited": 0, "params": sum(p.numel() for p in m.parameters()), "macs": 0}
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p = side(m.kernel_size), side(m.stride), side(m.padding)
            h_out, formula, unvisited = window_rule(h, k, s, p)
            w_out, _, _ = window_rule(w, k, s, p)
            c_out = m.out_channels if isinstance(m, nn.Conv2d) else c
            row.update(floor=formula, unvisited=unvisited, spec=f"k{k} s{s} p{p}")
            if isinstance(m, nn.Conv2d):
                row["macs"] = c_out * h_out * w_out * (c // m.groups) * k * k * batch_size
            shape = (c_out, h_out, w_out)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            shape = (c, 1, 1)
        elif isinstance(m, nn.Flatten):
            shape = (c * h * w,)
        row["output_shape"] = list(shape)
        n_out = batch_size * math.prod(shape)
        row["activation_elems"] = n_out
        row["activation_bytes"] = n_out * FP32
        nxt = leaves[i + 1][1] if i + 1 < len(leaves) else None
        saved = n_out * FP32 if isinstance(m, nn.ReLU) or isinstance(nxt, SAVES_INPUT) else 0
        if isinstance(m, nn.MaxPool2d):
            saved += n_out * INT64  # argmax indices for the backward pass
        if isinstance(m, nn.Dropout) and m.p > 0:
            saved += n_out * BOOL  # the keep-mask
        row["saved_bytes"] = saved
        rows.append(row)
    return rows


OPTIMIZER_STATES = {"sgd": 0, "sgd-momentum": 1, "adamw": 2}  # fp32 tensors per parameter


def memory_estimate(rows: list[dict], config: NiNConfig, batch_size: int, optimizer: str = "sgd-momentum",
                    image_size: int | None = None) -> dict:
    """Bytes for training (weights, gradients, optimizer state, saved activations) and for
    prediction (weights plus the largest input+output pair alive at once)."""
    size = image_size or config.image_size
    params = sum(r["params"] for r in rows)
    input_bytes = batch_size * config.in_channels * size * size * FP32
    weights = params * FP32
    saved = input_bytes + sum(r["saved_bytes"] for r in rows)  # conv1 keeps the input image
    training = {
        "weights": weights,
        "gradients": weights,
        "optimizer_state": OPTIMIZER_STATES[optimizer] * weights,
        "saved_activations": saved,
    }
    training["total"] = sum(training.values())
    pair = max(
        (prev + r["activation_bytes"] for prev, r in zip([input_bytes] + [x["activation_bytes"] for x in rows], rows)),
        default=0,
    )
    prediction = {"weights": weights, "largest_activation_pair": pair, "total": weights + pair}
    return {"batch_size": batch_size, "optimizer": optimizer, "training": training, "prediction": prediction}


def report(config: NiNConfig, batch_size: int = 1, optimizer: str = "sgd-momentum", image_size: int | None = None) -> dict:
    rows = layer_table(config, batch_size, image_size)
    return {
        "config": config.to_dict(),
        "batch_size": batch_size,
        "image_size": image_size or config.image_size,
        "layers": rows,
        "total_params": sum(r["params"] for r in rows),
        "total_macs": sum(r["macs"] for r in rows),
        "memory": memory_estimate(rows, config, batch_size, optimizer, image_size),
    }
