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


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    config: NiNConfig,
    rt: Runtime,
    *,
    augment: bool,
    label_smoothing: float,
    image_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a (B, 28, 28) uint8 batch already on the device.

    Returns the loss and the number of correct predictions as device tensors: nothing here
    reads a value back or copies from the host, so on a GPU the host runs ahead of the device
    (tests/test_gpu.py runs it under torch.cuda.set_sync_debug_mode("error")).
    """
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
    return loss.detach(), (logits.argmax(1) == y).sum()


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
    sync_every: int = 20,
) -> dict:
    """Train on `batches` (index tensors into `images`, on its device) until done or `should_stop()`.

    Returns summed loss/correct/count over this rank's images and how many batches ran. The
    running sums stay on the device; they are read back (one host sync) every `sync_every`
    steps for the progress bar and the non-finite-loss check, and at the end.
    """
    model.train()
    sums = torch.zeros(2, device=rt.device, dtype=torch.float64)  # loss*n, correct
    n = 0  # images seen; counted on the host, it needs no copy
    start, done = time.perf_counter(), 0
    bar = tqdm(batches, desc=desc, disable=None if rt.is_main else True, leave=False, dynamic_ncols=True)  # None: off in log files
    for done, idx in enumerate(bar, 1):
        loss, correct = train_step(model, optimizer, scheduler, images[idx], labels[idx], config, rt,
                                   augment=augment, label_smoothing=label_smoothing, image_size=image_size)
        sums[0] += loss.double() * len(idx)
        sums[1] += correct
        n += len(idx)
        if done % sync_every == 0 or done == len(batches):
            loss_sum, correct_sum = sums.tolist()
            if not math.isfinite(loss_sum):
                raise NonFiniteLossError(
                    f"loss became {loss_sum / n} at batch {done} (lr {scheduler.get_last_lr()[0]:.3g}); "
                    "lower --lr, or enable BatchNorm (--batch-norm)"
                )
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{loss_sum / n:.4f}", acc=f"{correct_sum / n:.3f}",
                img_s=f"{n * rt.world_size / elapsed:.0f}", lr=f"{scheduler.get_last_lr()[0]:.3g}",
                peak_mb=f"{peak_memory_mb(rt.device):.0f}",
            )
        on_step(done)
        if should_stop():
            break
    bar.close()
    totals = torch.cat([sums, torch.full((1,), float(n), dtype=torch.float64, device=rt.device)])  # a fill, not a copy
    all_reduce_sum(totals, rt)
    loss_sum, correct, n_all = totals.tolist()
    seconds = time.perf_counter() - start
    return dict(loss_sum=loss_sum, correct=correct, n=n_all, batches=done, seconds=seconds)


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
    idx_all = torch.arange(rt.rank, len(images), rt.world_size, device=images.device)
    k = config.num_classes
    confusion = torch.zeros(k * k, device=rt.device, dtype=torch.float64)
    loss_sum = torch.zeros(1, device=rt.device, dtype=torch.float64)
    for idx in idx_all.split(batch_size):
        x = to_model_input(images[idx], config, rt.channels_last, image_size)
        y = labels[idx]
        with rt.autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        # scatter_add, not bincount: CUDA's bincount reads the maximum back to size its output
        confusion.scatter_add_(0, y * k + logits.argmax(1), torch.ones_like(y, dtype=confusion.dtype))
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
