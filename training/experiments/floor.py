"""Which input pixels a strided window reads: the floor in out = floor((in + 2p - k)/s) + 1
drops the *last* rows and columns, always the same ones, never a random crop.

Everything here is measured on real torch layers (a perturbation reaches an output or not),
not derived from the formula it checks.
"""

from __future__ import annotations

import torch
from torch import nn

from training.model import NiN
from training.resources import side, window_rule


def rows_read(size: int, k: int, s: int, p: int) -> list[tuple[int, int]]:
    """For each output row of a k/s/p window over `size` input rows, the first and last *real*
    input row it reads (padding rows excluded), from the formula."""
    out, _, _ = window_rule(size, k, s, p)
    return [(max(i * s - p, 0), min(i * s - p + k - 1, size - 1)) for i in range(out)]


@torch.no_grad()
def measured_coverage(layer: nn.Module, size: int) -> torch.Tensor:
    """How many outputs each input pixel of a (1, 1, size, size) input reaches, found by
    perturbing the pixel and counting the outputs that change (one row at a time, then one
    column at a time: windows are separable, so coverage(r, c) = rows(r) * cols(c))."""
    x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0)) + 1.0
    base = layer(x)
    counts = []
    for axis in (2, 3):
        per = torch.zeros(size, dtype=torch.long)
        for i in range(size):
            y = x.clone()
            y.select(axis, i).add_(1.0)
            changed = (layer(y) != base).any(dim=1)[0]  # (H_out, W_out)
            # outputs along the other axis all change together; count along this axis only
            per[i] = int(changed.any(dim=1 if axis == 2 else 0).sum())
        counts.append(per)
    return counts[0].view(-1, 1) * counts[1].view(1, -1)


def conv_probe(k: int, s: int, p: int) -> nn.Conv2d:
    """A 1-channel convolution with all-ones weights: every pixel in its window moves the output."""
    conv = nn.Conv2d(1, 1, k, stride=s, padding=p, bias=False)
    nn.init.ones_(conv.weight)
    return conv


def nin_first_layers(size: int = 224) -> list[dict]:
    """The rule for NiN's windows wider than a pixel, up to the head, read off the model at
    `size`: output size, the formula, the rows never read."""
    rows, h = [], size
    with torch.device("meta"):  # shapes only: no weights, no draw from torch's RNG
        model = NiN()
    for m in model.modules():
        if isinstance(m, nn.Dropout):  # the head follows
            break
        if not isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            continue
        k, s, p = side(m.kernel_size), side(m.stride), side(m.padding)
        if k == 1:
            continue
        out, formula, unvisited = window_rule(h, k, s, p)
        name = f"{'conv' if isinstance(m, nn.Conv2d) else 'maxpool'} {k}x{k}" + (f" s{s}" if s > 1 else "") + (f" p{p}" if p else "")
        rows.append({"layer": name, "input": h, "formula": formula, "output": out, "unread_last_rows": unvisited,
                     "unread": f"rows {h - unvisited}..{h - 1}" if unvisited > 1 else (f"row {h - 1}" if unvisited else "none")})
        h = out
    return rows
