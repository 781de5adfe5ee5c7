"""PNG figures: training curves, confusion matrix, learning-rate range test."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.checkpoint import atomic_write  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_curves(metrics: list[dict], path: str | os.PathLike) -> None:
    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax_loss.plot(epochs, [m["test_loss"] for m in metrics], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [m["train_acc"] for m in metrics], "o-", label="train")
    ax_acc.plot(epochs, [m["test_acc"] for m in metrics], "o-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_confusion(confusion, class_names, path: str | os.PathLike, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(confusion, cmap="Blues")
    k = len(class_names)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    high = confusion.max() / 2
    for i in range(k):
        for j in range(k):
            v = int(confusion[i][j])
            ax.text(j, i, v, ha="center", va="center", fontsize=7, color="white" if v > high else "black")
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def plot_lr_find(lrs, losses, suggestion: float, path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", ls="--", label=f"suggested lr {suggestion:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss", title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
