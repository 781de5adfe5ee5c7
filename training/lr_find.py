"""Learning-rate range test (Smith 2017): raise the lr exponentially, one batch per step, and
watch the loss. The suggestion is the lr where the smoothed loss falls fastest, a common rule
that lands a little below the lr at which training blows up."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import write_json
from training.engine import train_step
from training.plots import plot_lr_find

log = logging.getLogger(__name__)


class LossSmoother:
    """Exponential moving average with bias correction (as in Adam): starts from 0, so the
    first average divided by (1 - beta) is exactly the first loss, and early points are not
    dragged towards the start value."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta, self.avg, self.n = beta, 0.0, 0

    def update(self, value: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        return self.avg / (1 - self.beta**self.n)


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """The lr at the steepest descent of the loss against log(lr), ignoring the noisy first
    tenth of the sweep and everything after the loss minimum's blow-up."""
    if len(lrs) < 5:
        raise ValueError(f"need at least 5 points to suggest an lr, got {len(lrs)}")
    lo = len(lrs) // 10
    hi = int(np.argmin(losses)) + 1
    if hi - lo < 3:
        return float(lrs[max(hi - 1, 0)] / 10)
    grad = np.gradient(np.asarray(losses[lo:hi]), np.log(np.asarray(lrs[lo:hi])))
    return float(lrs[lo + int(np.argmin(grad))])


def run_lr_find(model, images, labels, config, rt, args, out: Path,
                start_lr: float = 1e-5, end_lr: float = 2.0) -> int:
    from training.train import build_optimizer  # the same optimizer and step the run would use

    steps = args.lr_find_steps
    optimizer = build_optimizer(model, args)
    for g in optimizer.param_groups:
        g["lr"] = start_lr
    gamma = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: gamma**step)  # start_lr * gamma**step
    gen = torch.Generator().manual_seed(args.seed)
    lrs, losses, smoother = [], [], LossSmoother()
    model.train()
    for _ in range(steps):
        lr = scheduler.get_last_lr()[0]
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen).to(images.device)
        # plain cross-entropy, as the committed range tests (reports/nin-exercises) measured it
        loss, _ = train_step(model, optimizer, scheduler, images[idx], labels[idx], config, rt,
                             augment=args.augment, label_smoothing=0.0)
        value = loss.item()
        debiased = smoother.update(value)
        if not math.isfinite(value) or (losses and debiased > 4 * min(losses)):
            break
        lrs.append(lr)
        losses.append(debiased)
    suggestion = suggest_lr(lrs, losses)
    out.mkdir(parents=True, exist_ok=True)
    plot_lr_find(lrs, losses, suggestion, out / "lr_find.png")
    write_json(out / "lr_find.json", {"lrs": lrs, "losses": losses, "suggested_lr": suggestion})
    print(f"suggested lr: {suggestion:.3g} (curve: {out / 'lr_find.png'})")
    return 0
