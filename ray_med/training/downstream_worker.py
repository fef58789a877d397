"""The Ray Train worker of the downstream stage: a stacked classifier (DDP across workers) behind the shared loop.

Every worker builds the same classifier (base + stage-1 adapter + downstream adapter +
head), encodes both splits, and trains with
:func:`~ray_med.training.classify.train_classifier`; with several workers the model is a
DDP replica and each takes its slice of every epoch. Each epoch ends with a report and a
Ray Train checkpoint (trainable weights, optimizer, best epoch), so a restarted worker
group resumes at the last finished epoch. Rank 0 writes the classifier folder, the dev
metrics with bootstrap CIs, the per-item predictions and the epoch plot, and returns the
metrics to the driver.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray.train.torch import prepare_model

from ray_med.adapters.classifier import merge_classifier, save_classifier
from ray_med.adapters.stacking import ClassifierSpec, build_classifier, describe_trainable
from ray_med.evaluation.classify import encode, predict
from ray_med.evaluation.metrics import classification_metrics
from ray_med.models import load_base_model, load_tokenizer
from ray_med.runtime import seed_everything
from ray_med.tasks.classification import TaskData
from ray_med.training.classify import train_classifier
from ray_med.training.config import FinetuneConfig
from ray_med.training.report import plot_epochs
from ray_med.training.worker import RayCheckpoints, reduce_mean, say, worker_info


@dataclass
class DownstreamSpec:
    """Everything a downstream worker needs, sent once through ``train_loop_config``."""

    cfg: FinetuneConfig
    base_path: str
    train: TaskData
    dev: TaskData
    task_type: str
    ordinal: bool
    out_dir: str
    threads: int


def downstream_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train ``train_loop_per_worker`` of the downstream stage; rank 0 returns the dev metrics."""
    spec: DownstreamSpec = config["spec"]
    cfg = spec.cfg
    torch.set_num_threads(spec.threads)
    seed_everything(cfg.run.seed)
    info = worker_info()
    rank, world = info.rank, info.world
    base = load_base_model(spec.base_path)
    cspec = ClassifierSpec(
        num_labels=len(spec.train.labels), task_type=spec.task_type, pooling=cfg.pooling, setting=cfg.setting,
        domain_adapter=cfg.domain_adapter, domain_trainable=cfg.domain_trainable,
        downstream=cfg.adapter if cfg.setting == "adapter" else None, labels=spec.train.labels,
    )
    model = build_classifier(base, cspec)
    counts = describe_trainable(model)
    tokenizer = load_tokenizer(spec.base_path)
    train_in = encode(tokenizer, spec.train, cfg.train.max_length)
    dev_in = encode(tokenizer, spec.dev, cfg.train.max_length)

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        return prepare_model(m, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})

    result = train_classifier(
        model, train_in, spec.train, dev_in, spec.dev, cfg.train, task_type=spec.task_type, ordinal=spec.ordinal,
        seed=cfg.run.seed, wrap=wrap if world > 1 else None, shard=(rank, world),
        checkpoints=RayCheckpoints(rank), reduce_mean=reduce_mean(world), log=say if rank == 0 else lambda _: None,
    )
    if rank != 0:
        return None
    scores = predict(model, dev_in, spec.task_type)
    metrics = classification_metrics(spec.dev.y, scores, spec.task_type, ordinal=spec.ordinal,
                                     n_bootstrap=cfg.bootstrap, seed=cfg.run.seed)
    metrics.update(result, **counts, task=cfg.data.task, setting=cfg.setting, method=cspec.downstream and
                   cspec.downstream.method, labels=spec.train.labels, n_train=len(spec.train.y))
    out = Path(spec.out_dir)
    save_classifier(model, cspec, out / "adapter", spec.base_path)
    if cfg.merge and cfg.setting == "adapter":
        merge_classifier(model, cspec, out / "merged", tokenizer)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    with open(out / "predictions.jsonl", "w") as f:
        for rid, y, p in zip(spec.dev.ids, spec.dev.y.tolist(), scores.tolist(), strict=True):
            f.write(json.dumps({"id": rid, "label": y, "scores": p}) + "\n")
    (out / "plots").mkdir(exist_ok=True)
    plot_epochs(result["history"], out / "plots" / "epochs.png")
    return metrics
