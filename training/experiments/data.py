"""The grid's data: one seeded, class-balanced subset of the real Fashion-MNIST (or, for the
plumbing tests, a tiny synthetic set with the same shapes)."""

from __future__ import annotations

import torch

from training.data import find_data_root, load_split


def balanced_subset(labels: torch.Tensor, n: int, seed: int, num_classes: int = 10) -> torch.Tensor:
    """Indices of `n` images, n / num_classes per class, drawn with a seeded permutation."""
    if n % num_classes:
        raise ValueError(f"a balanced subset needs a multiple of {num_classes} images, got {n}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    picked = [order[labels[order] == c][: n // num_classes] for c in range(num_classes)]
    if any(len(p) < n // num_classes for p in picked):
        raise ValueError(f"not enough images for {n // num_classes} per class")
    return torch.cat(picked).sort().values


def synthetic(n: int, seed: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 28, 28) uint8 images whose class is a bright band at a class-specific height, in noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for c in range(num_classes):
        images[labels == c, 2 + 2 * c: 6 + 2 * c, 4:24] = 220
    return images, labels


def load(budget, data_dir: str | None, use_synthetic: bool, device: torch.device) -> dict:
    """{"train": (x, y), "test": (x, y), "source": str} on `device`, as the budget asks."""
    if use_synthetic:
        train = synthetic(budget.train_images or 600, budget.seed)
        test = synthetic(budget.test_images or 200, budget.seed + 1)
        source = "synthetic bands (plumbing only)"
    else:
        root = find_data_root(data_dir, allow_download=False)
        train, test = load_split(root, train=True), load_split(root, train=False)
        source = "Fashion-MNIST"
    if budget.train_images and not use_synthetic:
        idx = balanced_subset(train[1], budget.train_images, budget.seed)
        train = (train[0][idx], train[1][idx])
    if budget.test_images:
        test = (test[0][: budget.test_images], test[1][: budget.test_images])
    return {"train": tuple(t.to(device) for t in train), "test": tuple(t.to(device) for t in test),
            "source": source}
