"""Training a stage-2 classifier with the shared loop (plain torch; the downstream worker shell calls it).

Warmup is counted in optimizer steps (Clinical LLaMA-LoRA passed a ratio where a step
count was expected). The loss is class-weighted cross-entropy with weights N/(K·n_k),
plain cross-entropy, or BCE for multi-label. After every epoch the dev set is scored;
early stopping watches dev macro AUROC, and the best epoch's trainable weights are the
ones kept. Dev only selects: having been chosen on, its AUROC is optimistic, so the
metrics a run reports come from a separate test split that the worker scores once,
after training (the driver makes the splits, ``tasks.classification.train_dev_test_split``).
Each epoch's order is a permutation seeded by (seed, epoch), so a run that
resumes from an epoch's checkpoint sees exactly the order it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ray_med.evaluation.classify import predict
from ray_med.evaluation.metrics import classification_metrics
from ray_med.tasks.classification import TaskData, class_weights
from ray_med.training.config import ClassifyTrainConfig
from ray_med.training.loop import Checkpointer, LoopSettings, StepResult, run_loop
from ray_med.training.schedule import warmup_linear
from ray_med.training.trainable import TrainableState


def _loss_fn(cfg: ClassifyTrainConfig, task_type: str, y: np.ndarray, k: int) -> Callable[..., torch.Tensor]:
    if task_type == "multilabel" or cfg.loss == "bce":
        return torch.nn.BCEWithLogitsLoss()
    weight = torch.tensor(class_weights(y, k), dtype=torch.float32) if cfg.loss == "weighted_ce" else None
    return torch.nn.CrossEntropyLoss(weight=weight)


def train_classifier(
    model: torch.nn.Module,
    train_inputs: dict[str, torch.Tensor],
    train: TaskData,
    dev_inputs: dict[str, torch.Tensor],
    dev: TaskData,
    cfg: ClassifyTrainConfig,
    *,
    task_type: str,
    ordinal: bool = False,
    seed: int = 0,
    report: Callable[[dict[str, Any]], None] | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    shard: tuple[int, int] = (0, 1),
    checkpoints: Checkpointer | None = None,
    reduce_mean: Callable[[float], float] = float,
    log: Callable[[str], None] = lambda _: None,
    name: str = "downstream",
    on_step: Callable[[Any], None] = lambda _: None,
) -> dict[str, Any]:
    """Train, early-stop on dev macro AUROC, restore the best epoch; return the history.

    ``report(row)`` gets every epoch's row. ``wrap`` (e.g. DDP) wraps the model for the
    forward/backward only; ``shard`` is (rank, world) so each data-parallel worker takes
    its own slice of every epoch; ``checkpoints`` (Ray Train's on a worker) saves the
    trainable weights, the optimizer and the best epoch's weights at every epoch end,
    reports them, and restores them on resume.
    """
    k = len(train.labels)
    loss_fn = _loss_fn(cfg, task_type, train.y, k)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rank, world = shard
    n = len(train.y)
    steps_per_epoch = math.ceil(n // world / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_linear(s, warmup_steps=cfg.warmup_steps, total_steps=total))
    runner = wrap(model) if wrap is not None else model
    y_train = torch.tensor(train.y)  # a copy: the labels may arrive read-only from the object store
    bce = task_type == "multilabel" or cfg.loss == "bce"

    def step(idx: torch.Tensor, boundary: bool) -> StepResult:
        mask = train_inputs["attention_mask"][idx]
        width = int(mask.sum(1).max())  # right padding: cut the batch to its longest example
        logits = runner(train_inputs["input_ids"][idx][:, :width], mask[:, :width])
        target = y_train[idx].float() if bce else y_train[idx]
        if cfg.loss == "bce" and task_type != "multilabel":
            target = torch.nn.functional.one_hot(y_train[idx], k).float()
        loss = loss_fn(logits, target)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return StepResult(loss.detach(), int(mask.sum()), float(norm), lr)

    def batches(epoch: int, skip: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        # Every rank takes n // world items, so all make the same number of steps (DDP's
        # all-reduce waits for every rank); the remainder waits for the next epoch's order.
        order = order[: n // world * world][rank::world]
        for b, i in enumerate(range(0, len(order), cfg.batch_size)):
            if b >= skip:
                yield order[i : i + cfg.batch_size]

    def evaluate() -> dict[str, float]:
        scores = predict(model, dev_inputs, task_type)
        runner.train()
        metrics = classification_metrics(dev.y, scores, task_type, ordinal=ordinal, n_bootstrap=0)
        return {"dev_auroc": metrics["auroc_macro"], "dev_accuracy": metrics["accuracy"]}

    weights = TrainableState(params, opt, sched, rank=rank, keep_best=True)

    settings = LoopSettings(
        name=name, epochs=cfg.epochs, log_every=cfg.log_every, per_epoch=True, monitor="dev_auroc",
        patience=cfg.patience, keep_best=True, total_steps=total, world=world,
    )
    def publish(metrics: dict[str, Any], checkpoint: Any) -> None:
        if checkpoints is not None:
            checkpoints.report(metrics, checkpoint)
        if report is not None:
            report(metrics)

    runner.train()
    state = run_loop(
        settings, step=step, batches=batches, evaluate=evaluate, report=publish,
        save=checkpoints.saver(weights.write) if checkpoints is not None else None,
        load=checkpoints.loader(weights.read) if checkpoints is not None else (lambda: None),
        reduce_mean=reduce_mean, on_best=weights.snapshot, restore_best=weights.restore, log=log, on_step=on_step,
    )
    epochs = [r for r in state.history if "train_loss" in r]
    return {"history": epochs, "best_epoch": state.best_epoch, "best_dev_auroc": state.best}
