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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ray_med.data.task_mixture import MixtureSettings, plan_epoch, shard
from ray_med.evaluation.metrics import classification_metrics
from ray_med.evaluation.multimodal import Pixels, Prepared, choice_probs, collate, loss_fn, mean_loss
from ray_med.training.loop import Checkpointer, LoopSettings, StepResult, run_loop
from ray_med.training.multimodal_config import MultimodalTrainSettings
from ray_med.training.trainable import TrainableState


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
    rank, world = shard_of
    tasks = list(train)
    sizes = {t: len(train[t]) for t in tasks}
    n_batches = max(world, sum(sizes.values()) // cfg.batch_size)
    steps_per_epoch = n_batches // world
    total = cfg.max_steps or max(1, steps_per_epoch * cfg.epochs)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / cfg.warmup_steps if s < cfg.warmup_steps
        else max(0.0, (total - s) / max(1, total - cfg.warmup_steps)),
    )
    runner = wrap(model) if wrap is not None else model
    compute_loss = loss_fn(runner)
    dtype = next(model.parameters()).dtype
    monitor = cfg.monitor or ("dev_auroc" if any(items and items[0].choice_ids is not None
                                                 for items in dev.values()) else "neg_dev_loss")

    def step(batch: list[Prepared], boundary: bool) -> StepResult:
        b = collate(batch, pixels, pad_id, dtype=dtype)
        loss = compute_loss(b)
        if not loss.requires_grad:
            # Phase projector on a batch without images: nothing trainable was used. A zero
            # that touches every trainable weight gives them zero gradients, so the step (and
            # DDP's all-reduce, which every rank must join) still happens.
            loss = loss + 0.0 * sum(p.sum() for p in params.values())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return StepResult(loss.detach(), int(b["attention_mask"].sum()), float(norm), lr, samples=len(batch))

    def batches(epoch: int, skip: int) -> Iterator[list[Prepared]]:
        plan = plan_epoch(sizes, mixture, batch_size=cfg.batch_size, n_batches=n_batches, seed=seed, epoch=epoch)
        for i, pairs in enumerate(shard(plan, rank, world)):
            if i >= skip:
                yield [train[t][j] for t, j in pairs]

    def evaluate() -> dict[str, float]:
        return dev_metrics(model, dev, pixels, pad_id, cfg.batch_size)

    weights = TrainableState(params, opt, sched, rank=rank, keep_best=cfg.keep_best)

    eval_every = cfg.eval_every
    if cfg.max_steps and not eval_every and cfg.max_steps <= steps_per_epoch:
        eval_every = cfg.max_steps  # a run shorter than an epoch still ends with a dev evaluation and a checkpoint
    settings = LoopSettings(
        name=name, max_steps=cfg.max_steps, epochs=None if cfg.max_steps else cfg.epochs, log_every=cfg.log_every,
        eval_every=eval_every, checkpoint_every=eval_every, per_epoch=eval_every == 0, monitor=monitor,
        patience=cfg.patience, keep_best=cfg.keep_best, total_steps=total, world=world,
    )

    def publish(metrics: dict[str, Any], checkpoint: Any) -> None:
        if checkpoints is not None:
            checkpoints.report(metrics, checkpoint)

    runner.train()
    kwargs = {"clock": clock} if clock is not None else {}
    state = run_loop(
        settings, step=step, batches=batches, evaluate=evaluate, report=publish,
        save=checkpoints.saver(weights.write) if checkpoints is not None else None,
        load=checkpoints.loader(weights.read) if checkpoints is not None else (lambda: None),
        reduce_mean=reduce_mean, on_best=weights.snapshot, restore_best=weights.restore, log=log, on_step=on_step, **kwargs,
    )
    return {"history": state.history, "best_dev": state.best, "best_step": state.best_step,
            "best_epoch": state.best_epoch, "monitor": monitor, "steps": state.step,
            "stopped_early": state.stopped_early, "steps_per_epoch": steps_per_epoch}


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
