"""Network in Network (Lin, Chen & Yan 2013) as in d2l.ai chapter 8.3.

Shapes in the comments are for the default config and a (B, 1, 224, 224) input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from training.config import NiNConfig

if TYPE_CHECKING:
    from training.runtime import Runtime


def nin_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    num_1x1: int = 2,
    batch_norm: bool = False,
    last_norm: bool = True,
) -> nn.Sequential:
    """A k x k convolution then `num_1x1` 1x1 convolutions (a per-pixel MLP), each with ReLU.

    `last_norm=False` leaves the block's final convolution without BatchNorm (the classifier
    block, whose outputs are the logits before pooling).
    """
    layers: list[nn.Module] = []
    convs = [(in_channels, kernel_size, stride, padding)] + [(out_channels, 1, 1, 0)] * num_1x1
    for i, (c_in, k, s, p) in enumerate(convs):
        norm = batch_norm and (last_norm or i < len(convs) - 1)
        layers.append(nn.Conv2d(c_in, out_channels, k, stride=s, padding=p, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def classifier(c_in: int, config: NiNConfig, block: dict) -> list[nn.Module]:
    """The textbook's classifier is one NiN block from 384 channels straight to num_classes; with
    `head_width` N it takes two steps: a 3x3 NiN block to N channels, then 1x1 convs to the classes."""
    if not config.head_width:
        return [nin_block(c_in, config.num_classes, 3, 1, 1, last_norm=False, **block)]
    return [
        nin_block(c_in, config.head_width, 3, 1, 1, **block),
        nin_block(config.head_width, config.num_classes, 1, 1, 0, last_norm=False, **block),
    ]


class NiN(nn.Module):
    def __init__(self, config: NiNConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or NiNConfig()
        c1, c2, c3 = config.widths
        block = dict(num_1x1=config.num_1x1, batch_norm=config.batch_norm)
        self.net = nn.Sequential(
            nin_block(config.in_channels, c1, 11, 4, 0, **block),  # (B, 96, 54, 54)
            nn.MaxPool2d(3, stride=2),  # (B, 96, 26, 26)
            nin_block(c1, c2, 5, 1, 2, **block),  # (B, 256, 26, 26)
            nn.MaxPool2d(3, stride=2),  # (B, 256, 12, 12)
            nin_block(c2, c3, 3, 1, 1, **block),  # (B, 384, 12, 12)
            nn.MaxPool2d(3, stride=2),  # (B, 384, 5, 5)
            nn.Dropout(config.dropout),
            # No fully connected layer: one channel per class ...
            *classifier(c3, config, block),  # (B, 10, 5, 5)
            # ... averaged over the remaining positions.
            nn.AdaptiveAvgPool2d((1, 1)),  # (B, 10, 1, 1)
            nn.Flatten(),  # (B, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_weights(model: nn.Module, scheme: str) -> None:
    """`xavier` as in d2l (uniform, zero bias), `kaiming` (He normal, fan_out, for ReLU nets),
    or `default` (PyTorch's own)."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                raise ValueError(f"unknown init scheme {scheme!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(config: NiNConfig, init: str, seed: int, rt: Runtime) -> nn.Module:
    """A fresh NiN: seeded, initialised by `init`, on `rt`'s device in its memory format."""
    torch.manual_seed(seed)
    model = NiN(config)
    init_weights(model, init)
    return rt.place(model)
