"""PNG figures: training curves, confusion matrix, learning-rate range test."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.checkpoint import atomic_write  # noqa: E402


def save(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)


def annotate(ax, matrix, fontsize: int) -> None:
    """Each cell's count on a heatmap, white on its darker half."""
    high = max(max(row) for row in matrix) / 2
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=fontsize, color="white" if v > high else "black")


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
    save(fig, path)


def plot_confusion(confusion, class_names, path: str | os.PathLike, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(confusion, cmap="Blues")
    k = len(class_names)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    annotate(ax, confusion, fontsize=7)
    fig.colorbar(im, ax=ax)
    save(fig, path)


def plot_lr_find(lrs, losses, suggestion: float, path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", ls="--", label=f"suggested lr {suggestion:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss", title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)
