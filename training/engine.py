"""One epoch of training and one evaluation pass. Both return numbers; neither writes files."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.config import NiNConfig
from training.data import random_crop_flip, to_model_input
from training.runtime import Runtime, all_reduce_sum, peak_memory_mb


class NonFiniteLossError(RuntimeError):
    pass


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    batches: list[torch.Tensor],
    config: NiNConfig,
    rt: Runtime,
    *,
    augment: bool,
    label_smoothing: float,
    image_size: int | None = None,
    should_stop: Callable[[], bool],
    on_step: Callable[[int], None] = lambda done: None,
    desc: str = "train",
) -> dict:
    """Train on `batches` (index tensors into `images`) until done or `should_stop()`.

    Returns summed loss/correct/count over this rank's images and how many batches ran.
    """
    model.train()
    sums = torch.zeros(3, device=rt.device, dtype=torch.float64)  # loss*n, correct, n
    start, done = time.perf_counter(), 0
    bar = tqdm(batches, desc=desc, disable=not rt.is_main, leave=False, dynamic_ncols=True)
    for done, idx in enumerate(bar, 1):
        x_u8, y = images[idx], labels[idx]
        if augment:
            x_u8 = random_crop_flip(x_u8)
        x = to_model_input(x_u8, config, rt.channels_last, image_size)
        with rt.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(), torch.tensor(len(y), device=rt.device)]).double()
        if done % 20 == 0 or done == len(batches):
            loss_sum, correct, n = sums.tolist()  # one sync every 20 steps, not every step
            if not math.isfinite(loss_sum):
                raise NonFiniteLossError(
                    f"loss became {loss_sum / n} at batch {done} (lr {scheduler.get_last_lr()[0]:.3g}); "
                    "lower --lr, or enable BatchNorm (--batch-norm)"
                )
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.3f}",
                img_s=f"{n * rt.world_size / elapsed:.0f}", lr=f"{scheduler.get_last_lr()[0]:.3g}",
                peak_mb=f"{peak_memory_mb(rt.device):.0f}",
            )
        on_step(done)
        if should_stop():
            break
    bar.close()
    all_reduce_sum(sums, rt)
    loss_sum, correct, n = sums.tolist()
    seconds = time.perf_counter() - start
    return dict(loss_sum=loss_sum, correct=correct, n=n, batches=done, seconds=seconds)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: NiNConfig,
    rt: Runtime,
    batch_size: int = 256,
    image_size: int | None = None,
) -> dict:
    """Loss, accuracy and confusion matrix (rows: true class, columns: predicted) over the
    images given; under DDP each rank takes a strided share and the sums are reduced."""
    model.eval()
    idx_all = torch.arange(rt.rank, len(images), rt.world_size)
    k = config.num_classes
    confusion = torch.zeros(k * k, device=rt.device, dtype=torch.float64)
    loss_sum = torch.zeros(1, device=rt.device, dtype=torch.float64)
    for idx in idx_all.split(batch_size):
        x = to_model_input(images[idx.to(images.device)], config, rt.channels_last, image_size)
        y = labels[idx.to(labels.device)]
        with rt.autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k).double()
    all_reduce_sum(confusion, rt)
    all_reduce_sum(loss_sum, rt)
    confusion = confusion.view(k, k).cpu().long()
    n = int(confusion.sum())
    return dict(
        loss=loss_sum.item() / max(n, 1),
        acc=confusion.diag().sum().item() / max(n, 1),
        n=n,
        confusion=confusion,
    )


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    return (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
