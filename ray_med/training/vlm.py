"""Training the multimodal model on a task mixture with the shared loop (plain torch; the worker shell calls it).

Each epoch is a plan of batches from :func:`ray_med.data.task_mixture.plan_epoch`: the
configured ratios (or proportional to size), at least ``min_per_task_per_batch`` of every
task in every batch, seeded by (seed, epoch), so a resumed run sees exactly the batches
the uninterrupted one would. With several data-parallel ranks, each takes every
``world``-th batch of the plan (:func:`~ray_med.data.task_mixture.shard`), the same
number on every rank. The loss is the model's own cross-entropy on the target tokens.

Dev (a seeded share of each task's training items, made by the driver) is scored at
every epoch end or every ``eval_every`` steps: macro AUROC of the choice tasks from the
option letters' probabilities, and the teacher-forced loss of every task. Early stopping
and the kept weights follow ``dev_auroc`` (the mean over choice tasks) when there is a
choice task, else the negated dev loss. Dev is identical on every rank (every rank
scores all of it with the same weights), so they all stop at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ray_med.data.task_mixture import MixtureSettings
from ray_med.evaluation.metrics import classification_metrics
from ray_med.evaluation.multimodal import Pixels, Prepared, choice_probs, collate, loss_fn, mean_loss
from ray_med.training.loop import Checkpointer
from ray_med.training.mixture_fit import fit_mixture
from ray_med.training.multimodal_config import MultimodalTrainSettings


def dev_metrics(model: torch.nn.Module, dev: dict[str, list[Prepared]], pixels: Pixels, pad_id: int,
                batch_size: int) -> dict[str, float]:
    """dev_<task>_auroc (choice tasks), dev_<task>_loss, dev_auroc (their mean) and dev_loss (the mean loss)."""
    out: dict[str, float] = {}
    aurocs, losses = [], []
    for task, items in dev.items():
        if not items:
            continue
        if items[0].choice_ids is not None:
            probs = choice_probs(model, items, pixels, pad_id, batch_size=batch_size)
            y = np.array([p.gold for p in items])
            k = probs.shape[1]
            m = classification_metrics(y, probs, "binary" if k == 2 else "multiclass", n_bootstrap=0)
            out[f"dev_{task}_auroc"] = m["auroc_macro"]
            aurocs.append(m["auroc_macro"])
        loss = mean_loss(model, items, pixels, pad_id, batch_size=batch_size)
        out[f"dev_{task}_loss"] = loss
        losses.append(loss)
    if aurocs:
        finite = [a for a in aurocs if math.isfinite(a)]
        out["dev_auroc"] = float(np.mean(finite)) if finite else float("nan")
    out["dev_loss"] = float(np.mean(losses)) if losses else float("nan")
    out["neg_dev_loss"] = -out["dev_loss"]
    return out


def train_vlm(
    model: torch.nn.Module,
    train: dict[str, list[Prepared]],
    dev: dict[str, list[Prepared]],
    cfg: MultimodalTrainSettings,
    mixture: MixtureSettings,
    *,
    pixels: Pixels,
    pad_id: int,
    seed: int = 0,
    shard_of: tuple[int, int] = (0, 1),
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    checkpoints: Checkpointer | None = None,
    reduce_mean: Callable[[float], float] = float,
    log: Callable[[str], None] = lambda _: None,
    on_step: Callable[[Any], None] = lambda _: None,
    name: str = "multimodal",
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Train until the epochs (or max_steps) are done or dev stops improving; return history and best."""
    runner = wrap(model) if wrap is not None else model
    compute_loss = loss_fn(runner)
    dtype = next(model.parameters()).dtype
    monitor = cfg.monitor or ("dev_auroc" if any(items and items[0].choice_ids is not None
                                                 for items in dev.values()) else "neg_dev_loss")

    def loss_of(batch: list[Prepared]) -> tuple[torch.Tensor, int]:
        b = collate(batch, pixels, pad_id, dtype=dtype)
        return compute_loss(b), int(b["attention_mask"].sum())

    return fit_mixture(model, train, cfg, mixture, loss_of=loss_of,
                       evaluate=lambda: dev_metrics(model, dev, pixels, pad_id, cfg.batch_size), monitor=monitor,
                       name=name, seed=seed, shard_of=shard_of, checkpoints=checkpoints, reduce_mean=reduce_mean,
                       log=log, on_step=on_step, clock=clock)


def split_dev(items: Sequence[Any], labels: Sequence[Any] | None, fraction: float, seed: int,
              max_items: int | None = None) -> tuple[list[int], list[int]]:
    """(train, dev) indices: a seeded share of the items (at most ``max_items``), stratified by label if any.

    Items not taken for dev stay in training.
    """
    rng = np.random.default_rng(seed)
    n = len(items)
    if max_items is not None and n:
        fraction = min(fraction, max_items / n)
    if labels is None:
        order = rng.permutation(n)
        k = max(1, round(n * fraction)) if n > 1 else 0
        return sorted(order[k:].tolist()), sorted(order[:k].tolist())
    dev: list[int] = []
    labels = list(labels)
    for lab in sorted(set(labels), key=str):
        idx = [i for i in range(n) if labels[i] == lab]
        idx = rng.permutation(idx).tolist()
        k = round(len(idx) * fraction) if len(idx) > 1 else 0
        dev += idx[:k]
    dev_set = set(dev)
    return [i for i in range(n) if i not in dev_set], sorted(dev)
