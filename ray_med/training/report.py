"""Plots of a run's history: loss curves for LM training, loss and dev metrics per epoch for classifiers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The object-oriented API needs no display and no backend choice (cluster nodes have neither).
from matplotlib.figure import Figure


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss, and held-out loss per source, against the step, as a PNG."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    evals = sorted({k for r in history for k in r if k.startswith("eval/") and k.endswith("/loss")})
    for key in evals:
        pts = [(r["step"], r[key]) for r in history if key in r]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"held-out {key.split('/')[1]}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_epochs(history: list[dict[str, Any]], path: Path) -> Path:
    """A classifier's training loss and dev metrics against the epoch, as a PNG."""
    fig = Figure(figsize=(9, 3.5))
    loss_ax, dev_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    for key in sorted({k for r in history for k in r if k.startswith("dev_")}):
        dev_ax.plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", label=key)
    dev_ax.set_xlabel("epoch")
    dev_ax.legend()
    for ax in (loss_ax, dev_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
