"""The Ray Train worker of the downstream stage: a stacked classifier (DDP across workers) behind the shared loop.

Every worker builds the same classifier (base + stage-1 adapter + downstream adapter +
head), encodes both splits, and trains with
:func:`~ray_med.training.classify.train_classifier`; with several workers the model is a
DDP replica and each takes ``n // world`` items of every epoch's seeded permutation (the
same number of steps on every rank). Each epoch ends with a report and a Ray Train
checkpoint (trainable weights, optimizer and schedule, the best epoch's weights, the
loop state), so a restarted worker group resumes at the last finished epoch and trains
on exactly the batches the uninterrupted run would have. Rank 0 writes the classifier folder, the test
split's metrics with bootstrap CIs, the per-item predictions and the epoch plot, and returns the
metrics to the driver.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.train.torch import prepare_model

from ray_med.adapters.classifier import merge_classifier, save_classifier
from ray_med.adapters.stacking import ClassifierSpec, build_classifier, describe_trainable
from ray_med.errors import ConfigError
from ray_med.evaluation.classify import encode, predict
from ray_med.evaluation.metrics import classification_metrics
from ray_med.models import load_base_model, load_tokenizer
from ray_med.runtime import Storage, localize, seed_everything
from ray_med.tasks.classification import TaskData
from ray_med.training.classify import train_classifier
from ray_med.training.config import FinetuneConfig
from ray_med.training.report import plot_epochs
from ray_med.training.speed import compile_layers
from ray_med.training.worker import RayCheckpoints, reduce_mean, say, test_fault, worker_info


@dataclass
class PreparedSplits:
    """The splits and their token ids, made once and shared through the object store (a sweep's trials)."""

    train: TaskData
    dev: TaskData
    test: TaskData
    inputs: dict[str, dict[str, torch.Tensor]]
    """Each split's ``encode`` output, by split name."""
    max_length: int
    """The ``train.max_length`` they were encoded with."""


def prepare_splits(tokenizer: Any, train: TaskData, dev: TaskData, test: TaskData, max_length: int) -> PreparedSplits:
    """Tokenize the three splits once."""
    return PreparedSplits(train=train, dev=dev, test=test, max_length=max_length, inputs={
        name: encode(tokenizer, split, max_length) for name, split in (("train", train), ("dev", dev), ("test", test))
    })


@dataclass
class DownstreamSpec:
    """Everything a downstream worker needs, sent once through ``train_loop_config``."""

    cfg: FinetuneConfig
    base_path: str
    train: TaskData | None
    dev: TaskData | None
    task_type: str
    ordinal: bool
    out_dir: str
    threads: int
    test: TaskData | None = None
    """The split the reported metrics come from (never trained or selected on); None: dev."""
    prepared: Any = None
    """An ``ObjectRef`` of :class:`PreparedSplits` (then train, dev and test are None): the splits already
    tokenized, read from the object store instead of tokenized by every worker of every trial."""


def downstream_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train ``train_loop_per_worker`` of the downstream stage; rank 0 returns the test split's metrics."""
    spec: DownstreamSpec = config["spec"]
    cfg = spec.cfg
    torch.set_num_threads(spec.threads)
    seed_everything(cfg.run.seed)
    info = worker_info()
    rank, world = info.rank, info.world
    # Folders in remote storage are downloaded once per node (runtime.localize's cache).
    base_path = localize(spec.base_path)
    base = load_base_model(base_path)
    tokenizer = load_tokenizer(base_path)
    if spec.prepared is not None:
        prepared: PreparedSplits = ray.get(spec.prepared)
        if prepared.max_length != cfg.train.max_length:
            raise ConfigError(f"the prepared splits were encoded with max_length {prepared.max_length}, "
                              f"the config says {cfg.train.max_length}")
        train, dev, test = prepared.train, prepared.dev, prepared.test
        train_in, dev_in, test_in = (prepared.inputs[k] for k in ("train", "dev", "test"))
    else:
        train, dev, test = spec.train, spec.dev, spec.test
        train_in = encode(tokenizer, train, cfg.train.max_length)
        dev_in = encode(tokenizer, dev, cfg.train.max_length)
        test_in = None
    labels = train.labels
    cspec = ClassifierSpec(
        num_labels=len(labels), task_type=spec.task_type, pooling=cfg.pooling, setting=cfg.setting,
        domain_adapter=localize(cfg.domain_adapter) if cfg.domain_adapter else None,
        domain_trainable=cfg.domain_trainable,
        downstream=cfg.adapter if cfg.setting == "adapter" else None, labels=labels,
    )
    model = build_classifier(base, cspec)
    counts = describe_trainable(model)
    if cfg.train.compile:
        # In place: DDP, the checkpoints and save_classifier see the same modules and parameter names.
        compile_layers(model)

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        return prepare_model(m, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})

    result = train_classifier(
        model, train_in, train, dev_in, dev, cfg.train, task_type=spec.task_type, ordinal=spec.ordinal,
        seed=cfg.run.seed, wrap=wrap if world > 1 else None, shard=(rank, world),
        checkpoints=RayCheckpoints(rank), reduce_mean=reduce_mean(world), log=say if rank == 0 else lambda _: None,
        on_step=test_fault(cfg.train.fail_at_step, "downstream", rank, world),
    )
    if rank != 0:
        return None
    final = test if test is not None else dev
    final_in = test_in if test is not None and test_in is not None else encode(tokenizer, final, cfg.train.max_length)
    scores = predict(model, final_in, spec.task_type)
    metrics = classification_metrics(final.y, scores, spec.task_type, ordinal=spec.ordinal,
                                     n_bootstrap=cfg.bootstrap, seed=cfg.run.seed)
    metrics.update(result, **counts, task=cfg.data.task, setting=cfg.setting, method=cspec.downstream and
                   cspec.downstream.method, labels=labels, n_train=len(train.y),
                   n_dev=len(dev.y), split="test" if test is not None else "dev")
    # Every output replaces its previous version only once written whole (runtime.Storage).
    out = Storage.parse(spec.out_dir)
    with out.local_dir("adapter") as folder:  # records the base and stage-1 adapter where they live, not the cache
        save_classifier(model, dataclasses.replace(cspec, domain_adapter=cfg.domain_adapter), folder, spec.base_path)
    if cfg.merge and cfg.setting == "adapter":
        with out.local_dir("merged") as folder:
            merge_classifier(model, cspec, folder, tokenizer, final_dir=out.join("merged"))
    out.write_text("metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
    out.write_text("predictions.jsonl", "".join(
        json.dumps({"id": rid, "label": y, "scores": p}) + "\n"
        for rid, y, p in zip(final.ids, final.y.tolist(), scores.tolist(), strict=True)))
    with out.local_dir("plots") as folder:
        plot_epochs(result["history"], folder / "epochs.png")
    return metrics
