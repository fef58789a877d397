"""Training on a task mixture with the shared loop: what the multimodal and the injection jobs share. No Ray.

A job gives its examples by task, a function turning a batch into a loss, and its dev
evaluation; this module owns the rest: AdamW over the trainable parameters with linear
warm-up and decay, gradient clipping, an epoch's batches from
:func:`ray_med.data.task_mixture.plan_epoch` (seeded by (seed, epoch), so a resumed run
sees the batches the uninterrupted one would) sharded by rank, the best weights kept
and checkpointed with the optimizer (:class:`~ray_med.training.trainable.TrainableState`),
and :func:`~ray_med.training.loop.run_loop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from ray_med.data.task_mixture import MixtureSettings, plan_epoch, shard
from ray_med.training.loop import Checkpointer, LoopSettings, StepResult, run_loop
from ray_med.training.schedule import warmup_linear
from ray_med.training.trainable import TrainableState


class MixtureTrainSettings(Protocol):
    """The fields of a job's train section this module reads."""

    batch_size: int
    epochs: int
    max_steps: int | None
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    patience: int | None
    log_every: int


def fit_mixture(
    model: torch.nn.Module,
    train: dict[str, Sequence[Any]],
    cfg: MixtureTrainSettings,
    mixture: MixtureSettings,
    *,
    loss_of: Callable[[list[Any]], tuple[torch.Tensor, int]],
    evaluate: Callable[[], dict[str, float]],
    monitor: str,
    name: str,
    seed: int = 0,
    shard_of: tuple[int, int] = (0, 1),
    checkpoints: Checkpointer | None = None,
    reduce_mean: Callable[[float], float] = float,
    log: Callable[[str], None] = lambda _: None,
    on_step: Callable[[Any], None] = lambda _: None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Train ``model``'s trainable parameters until the epochs (or max_steps) end or ``monitor`` stops improving.

    ``loss_of(batch)`` returns (loss, tokens) for a list of items (it runs the wrapped,
    e.g. DDP, model); ``cfg`` may also have ``eval_every`` (0: at every epoch end) and
    ``keep_best`` (default true).
    """
    rank, world = shard_of
    sizes = {t: len(items) for t, items in train.items()}
    n_batches = max(world, sum(sizes.values()) // cfg.batch_size)
    steps_per_epoch = n_batches // world
    total = cfg.max_steps or max(1, steps_per_epoch * cfg.epochs)
    keep_best = getattr(cfg, "keep_best", True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_linear(s, warmup_steps=cfg.warmup_steps, total_steps=total))

    def step(batch: list[Any], boundary: bool) -> StepResult:
        loss, tokens = loss_of(batch)
        if not loss.requires_grad:
            # A batch that used no trainable weight (e.g. the multimodal projector phase on
            # text-only items): a zero touching every trainable weight gives them zero
            # gradients, so the step (and DDP's all-reduce, which every rank joins) happens.
            loss = loss + 0.0 * sum(p.sum() for p in params.values())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return StepResult(loss.detach(), tokens, float(norm), lr, samples=len(batch))

    def batches(epoch: int, skip: int) -> Iterator[list[Any]]:
        plan = plan_epoch(sizes, mixture, batch_size=cfg.batch_size, n_batches=n_batches, seed=seed, epoch=epoch)
        for i, pairs in enumerate(shard(plan, rank, world)):
            if i >= skip:
                yield [train[t][j] for t, j in pairs]

    weights = TrainableState(params, opt, sched, rank=rank, keep_best=keep_best)
    eval_every = getattr(cfg, "eval_every", 0)
    if cfg.max_steps and not eval_every and cfg.max_steps <= steps_per_epoch:
        eval_every = cfg.max_steps  # a run shorter than an epoch still ends with a dev evaluation and a checkpoint
    settings = LoopSettings(
        name=name, max_steps=cfg.max_steps, epochs=None if cfg.max_steps else cfg.epochs, log_every=cfg.log_every,
        eval_every=eval_every, checkpoint_every=eval_every, per_epoch=eval_every == 0, monitor=monitor,
        patience=cfg.patience, keep_best=keep_best, total_steps=total, world=world,
    )

    def publish(metrics: dict[str, Any], checkpoint: Any) -> None:
        if checkpoints is not None:
            checkpoints.report(metrics, checkpoint)

    model.train()
    kwargs = {"clock": clock} if clock is not None else {}
    state = run_loop(
        settings, step=step, batches=batches, evaluate=evaluate, report=publish,
        save=checkpoints.saver(weights.write) if checkpoints is not None else None,
        load=checkpoints.loader(weights.read) if checkpoints is not None else (lambda: None),
        reduce_mean=reduce_mean, on_best=weights.snapshot, restore_best=weights.restore, log=log, on_step=on_step,
        **kwargs,
    )
    return {"history": state.history, "best_dev": state.best, "best_step": state.best_step,
            "best_epoch": state.best_epoch, "monitor": monitor, "steps": state.step,
            "stopped_early": state.stopped_early, "steps_per_epoch": steps_per_epoch}
