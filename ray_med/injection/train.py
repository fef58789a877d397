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
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ray_med.adapters.m3oe import GateStats, load_balance_loss
from ray_med.data.task_mixture import MixtureSettings
from ray_med.evaluation.metrics import classification_metrics
from ray_med.injection.config import InjectTrainSettings
from ray_med.injection.model import InjectedModel, Item, choice_probs, collate, last_logits, to_device
from ray_med.training.loop import Checkpointer
from ray_med.training.mixture_fit import fit_mixture


def task_auroc(probs: np.ndarray, items: list[Item], n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    y = np.array([it.gold for it in items])
    k = probs.shape[1]
    return classification_metrics(y, probs, "binary" if k == 2 else "multiclass", n_bootstrap=n_bootstrap, seed=seed)


def dev_metrics(model: InjectedModel, dev: dict[str, list[Item]], pad: int, batch_size: int) -> dict[str, float]:
    """dev_<task>_auroc, dev_auroc (their mean) and, for M3OE, gate_<task>_entropy."""
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
    runner = wrap(model) if wrap is not None else model
    device = next(model.llm.parameters()).device
    mixture = MixtureSettings(min_per_task_per_batch=1 if cfg.batch_size >= len(train) else 0)
    k = top_k or (model.m3oe.cfg.experts if model.m3oe is not None else 1)

    def loss_of(batch: list[Item]) -> tuple[torch.Tensor, int]:
        b = to_device(collate(batch, pad), device)
        logits, gate = last_logits(runner, b)
        loss = torch.nn.functional.cross_entropy(logits, b["gold_token"])
        if gate is not None and load_balance > 0:
            loss = loss + load_balance * load_balance_loss(gate.probs, k)
        return loss, int(b["attention_mask"].sum())

    return fit_mixture(model, train, cfg, mixture, loss_of=loss_of,
                       evaluate=lambda: dev_metrics(model, dev, pad, cfg.batch_size * 2), monitor="dev_auroc",
                       name="inject", seed=seed, shard_of=shard_of, checkpoints=checkpoints, reduce_mean=reduce_mean,
                       log=log, on_step=on_step)
