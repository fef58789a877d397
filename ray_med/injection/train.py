"""Training the injected model on the seen tasks with the shared loop (plain torch; the worker shell calls it).

Each epoch is a plan of batches over the seen tasks (:func:`ray_med.data.task_mixture.plan_epoch`:
proportional to size, every task in every batch, seeded by (seed, epoch)), sharded by
rank. The loss is the cross-entropy of the answer word's token at the last prompt
position (what top-token scoring reads), plus, for M3OE, ``load_balance`` times the
router's load-balancing loss. Dev (the federated split's dev rows of each seen task) is
scored at every epoch end: macro AUROC per task from the answer words' probabilities,
their mean (``dev_auroc``, which early stopping and the kept weights follow), and, for
M3OE, each task's gate entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ray_med.data.task_mixture import MixtureSettings, plan_epoch, shard
from ray_med.evaluation.metrics import classification_metrics
from ray_med.injection.config import InjectTrainSettings
from ray_med.injection.model import InjectedModel, Item, choice_probs, collate, last_logits, to_device
from ray_med.training.loop import Checkpointer, LoopSettings, StepResult, run_loop
from ray_med.training.trainable import TrainableState


def task_auroc(probs: np.ndarray, items: list[Item], n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    y = np.array([it.gold for it in items])
    k = probs.shape[1]
    return classification_metrics(y, probs, "binary" if k == 2 else "multiclass", n_bootstrap=n_bootstrap, seed=seed)


def dev_metrics(model: InjectedModel, dev: dict[str, list[Item]], pad: int, batch_size: int) -> dict[str, float]:
    """dev_<task>_auroc, dev_auroc (their mean) and, for M3OE, gate_<task>_entropy."""
    from ray_med.adapters.m3oe import GateStats  # lazy: the adapters package imports peft

    stats = GateStats() if model.m3oe is not None else None
    out: dict[str, float] = {}
    aurocs = []
    for task, items in dev.items():
        if not items:
            continue
        m = task_auroc(choice_probs(model, items, pad, batch_size=batch_size, stats=stats), items)
        out[f"dev_{task}_auroc"] = m["auroc_macro"]
        aurocs.append(m["auroc_macro"])
    finite = [a for a in aurocs if math.isfinite(a)]
    out["dev_auroc"] = float(np.mean(finite)) if finite else float("nan")
    if stats is not None:
        for task, s in stats.summary().items():
            out[f"gate_{task}_entropy"] = float(s["entropy"])
    return out


def train_injection(
    model: InjectedModel,
    train: dict[str, list[Item]],
    dev: dict[str, list[Item]],
    cfg: InjectTrainSettings,
    *,
    pad: int,
    load_balance: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    shard_of: tuple[int, int] = (0, 1),
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    checkpoints: Checkpointer | None = None,
    reduce_mean: Callable[[float], float] = float,
    log: Callable[[str], None] = lambda _: None,
    on_step: Callable[[Any], None] = lambda _: None,
) -> dict[str, Any]:
    """Train the projectors and the adapter until the epochs (or max_steps) end or dev stops improving."""
    from ray_med.adapters.m3oe import load_balance_loss  # lazy: as above

    rank, world = shard_of
    sizes = {t: len(v) for t, v in train.items()}
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
    device = next(model.llm.parameters()).device
    mixture = MixtureSettings(min_per_task_per_batch=1 if cfg.batch_size >= len(sizes) else 0)
    k = top_k or (model.m3oe.cfg.experts if model.m3oe is not None else 1)

    def step(batch: list[Item], boundary: bool) -> StepResult:
        b = to_device(collate(batch, pad), device)
        logits, gate = last_logits(runner, b)
        loss = torch.nn.functional.cross_entropy(logits, b["gold_token"])
        if gate is not None and load_balance > 0:
            loss = loss + load_balance * load_balance_loss(gate.probs, k)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return StepResult(loss.detach(), int(b["attention_mask"].sum()), float(norm), lr, samples=len(batch))

    def batches(epoch: int, skip: int) -> Iterator[list[Item]]:
        plan = plan_epoch(sizes, mixture, batch_size=cfg.batch_size, n_batches=n_batches, seed=seed, epoch=epoch)
        for i, pairs in enumerate(shard(plan, rank, world)):
            if i >= skip:
                yield [train[t][j] for t, j in pairs]

    weights = TrainableState(params, opt, sched, rank=rank, keep_best=True)
    settings = LoopSettings(
        name="inject", max_steps=cfg.max_steps, epochs=None if cfg.max_steps else cfg.epochs,
        log_every=cfg.log_every, eval_every=cfg.max_steps if cfg.max_steps and cfg.max_steps <= steps_per_epoch else 0,
        per_epoch=True, monitor="dev_auroc", patience=cfg.patience, keep_best=True, total_steps=total, world=world,
    )
    settings.checkpoint_every = settings.eval_every

    def publish(metrics: dict[str, Any], checkpoint: Any) -> None:
        if checkpoints is not None:
            checkpoints.report(metrics, checkpoint)

    runner.train()
    state = run_loop(
        settings, step=step, batches=batches, evaluate=lambda: dev_metrics(model, dev, pad, cfg.batch_size * 2),
        report=publish, save=checkpoints.saver(weights.write) if checkpoints is not None else None,
        load=checkpoints.loader(weights.read) if checkpoints is not None else (lambda: None),
        reduce_mean=reduce_mean, on_best=weights.snapshot, restore_best=weights.restore, log=log, on_step=on_step,
    )
    return {"history": state.history, "best_dev": state.best, "best_step": state.best_step,
            "best_epoch": state.best_epoch, "steps": state.step, "stopped_early": state.stopped_early,
            "steps_per_epoch": steps_per_epoch}
