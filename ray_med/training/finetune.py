"""Two-stage adapter fine-tuning (Clinical LLaMA-LoRA) on Ray Train: the driver of ``jobs/finetune.py``.

* ``stage: domain`` trains one adapter (any registered method) as a causal LM on a
  corpus of clinical notes, over a frozen base. It is pretraining's training
  (:func:`~ray_med.training.pretrain.train_lm`: the same worker, the same held-out
  perplexity) with an adapter, and writes the adapter in PEFT format to
  ``<output_dir>/adapter``.
* ``stage: downstream`` trains a classifier: the base, the stage-1 adapter (optional;
  frozen or trainable), a new downstream adapter (optional) and a head, on a task's
  train split, early-stopping on (and keeping the best epoch by) dev macro AUROC
  (:mod:`~ray_med.training.downstream_worker`). The seeded, stratified train/dev/test
  split is made here and written first, as ``<output_dir>/splits.json`` (the ids of
  each split). It writes ``<output_dir>/adapter`` (the classifier folder,
  :mod:`ray_med.adapters.classifier`), ``metrics.json`` (AUROC, AUPRC, macro F1 and
  accuracy with bootstrap CIs, on the test split: never trained on nor selected on),
  ``predictions.jsonl`` (the test split) and ``plots/epochs.png``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ray_med.adapters.registry import METHODS, method_of_folder
from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.errors import ConfigError
from ray_med.evaluation.classify_eval import SPLITS_FILE
from ray_med.models import load_config
from ray_med.runtime import RunContext, Storage, init_ray, localize
from ray_med.tasks import Task, get_task, task_data
from ray_med.tasks.classification import Splits, TaskData, train_dev_test_split
from ray_med.training.config import FinetuneConfig, FinetuneOutputs, PretrainConfig
from ray_med.training.downstream_worker import DownstreamSpec, downstream_worker
from ray_med.training.preflight import check_adapter, check_batches, meta_model
from ray_med.training.pretrain import timing_line, timings, train_lm
from ray_med.training.trainer import build_trainer, fit, threads_per_worker

log = logging.getLogger("ray_med.finetune")


def run_prefix(cfg: FinetuneConfig) -> str:
    """The run-name prefix of a fine-tuning run: finetune-domain for stage 1, finetune for stage 2."""
    return "finetune-domain" if cfg.stage == "domain" else "finetune"


def run_finetune(cfg: FinetuneConfig, ctx: RunContext) -> FinetuneOutputs:
    """Run the configured stage; print where the adapter and metrics went."""
    if cfg.stage == "domain":
        return _run_domain(cfg, ctx)
    return _run_downstream(cfg, ctx)


def _run_domain(cfg: FinetuneConfig, ctx: RunContext) -> FinetuneOutputs:
    if cfg.model.path:
        cfg = replace(cfg, model=replace(cfg.model, path=resolve_path(cfg.model.path)))
    pcfg = PretrainConfig(
        run=cfg.run, model=cfg.model, tokenizer=cfg.tokenizer, corpus=cfg.corpus, train=cfg.lm, optim=cfg.optim,
        scaling=cfg.scaling, eval=cfg.eval, checkpoint=cfg.checkpoint, output_dir=cfg.output_dir,
    )
    result, history = train_lm(pcfg, ctx, adapter=cfg.adapter, name="domain")
    metrics = {**(result.metrics or {}), **timings(history)}
    adapter_dir = f"{(cfg.output_dir or ctx.dir).rstrip('/')}/adapter"
    print(f"\ndomain adaptation finished at step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}")
    print(f"domain adapter: {adapter_dir}  (PEFT format: adapter_config.json + adapter_model.safetensors)")
    print(f"metrics:     {ctx.path('metrics.json')}  plot: {ctx.path('plots', 'loss.png')}")
    print(timing_line(metrics))
    return FinetuneOutputs(run_dir=ctx.dir, stage="domain", adapter_dir=adapter_dir, metrics=metrics,
                           history=history)


@dataclass
class DownstreamInputs:
    """The downstream stage's checked inputs: the config with its paths resolved, the task's data, its split."""

    cfg: FinetuneConfig
    task: Task
    base_path: str
    data_path: str
    reader: str
    split_seed: int
    data: TaskData
    splits: Splits

    def splits_json(self) -> str:
        """``splits.json``: the ids of every split (evaluate.py classify scores the test split from it)."""
        d = self.cfg.data
        split_ids = self.splits.ids(self.data)
        return json.dumps({
            "task": self.task.name, "data": self.data_path, "reader": self.reader, "seed": self.split_seed,
            "dev_size": d.dev_size, "test_size": d.test_size,
            "n": {k: len(v) for k, v in split_ids.items()}, **split_ids,
        }, indent=1) + "\n"


def prepare_downstream(cfg: FinetuneConfig, *, check: bool = True) -> DownstreamInputs:
    """Check the folders and the adapter, read the task's data and split it (seeded, stratified).

    Everything here runs before any worker starts: a typo should be one line, not a
    worker-group traceback minutes later. ``check=False`` skips the per-config checks of
    the adapter and the batch size (a sweep makes them once per trial).
    """
    task = get_task(cfg.data.task)
    if not cfg.model.path:
        raise ConfigError("downstream: set model.path to the base model folder (a preset has no trained weights)")
    base_path = resolve_path(cfg.model.path)
    # A folder in remote storage is downloaded once (runtime.localize's cache); the
    # workers read it from the URI.
    local_base = localize(base_path, what="model folder")
    load_config(local_base)
    if cfg.setting == "full" and cfg.domain_adapter:
        raise ConfigError("setting=full fine-tunes every weight and takes no adapters; set domain_adapter=null")
    if cfg.domain_adapter:
        # Absolute from here on: the classifier folder records it, and a relative path
        # there would be read as relative to that folder (domain_folder), not to this job.
        cfg = replace(cfg, domain_adapter=resolve_path(cfg.domain_adapter))
        method = method_of_folder(localize(cfg.domain_adapter, what="domain adapter folder"))
        if method is None or not method.stackable:
            raise ConfigError(f"domain_adapter {cfg.domain_adapter}: a stage-1 adapter under a classifier must be "
                              f"one of {', '.join(m.name for m in METHODS.values() if m.stackable)}")
    data_path = cfg.data.path
    if not data_path.startswith("pkg://") and not Path(data_path).expanduser().is_absolute():
        data_path = str(Path(cfg.data.root) / data_path)
    data_path = resolve_path(data_path)
    reader = cfg.data.reader or task.reader
    records = read_records(reader, data_path, on_error=cfg.data.on_error).records
    data = task_data(task, records)
    split_seed = cfg.run.seed if cfg.data.split_seed is None else cfg.data.split_seed
    splits = train_dev_test_split(data.y, cfg.data.dev_size, cfg.data.test_size, seed=split_seed)
    inputs = DownstreamInputs(cfg=cfg, task=task, base_path=base_path, data_path=data_path, reader=reader,
                              split_seed=split_seed, data=data, splits=splits)
    if check:
        check_downstream(cfg, local_base, len(splits.train))
    return inputs


def check_downstream(cfg: FinetuneConfig, local_base: str, n_train: int) -> None:
    """The checks that depend on the adapter and the batch size (a sweep's trials vary them)."""
    if cfg.setting == "adapter":
        check_adapter(meta_model(replace(cfg.model, path=local_base)), cfg.adapter, task_type=None,
                      stage="downstream")
    check_batches(n_train, batch_size=cfg.train.batch_size, workers=cfg.scaling.num_workers,
                  what="the training split", unit="items", fix="lower train.batch_size or scaling.num_workers")


def _run_downstream(cfg: FinetuneConfig, ctx: RunContext) -> FinetuneOutputs:
    inputs = prepare_downstream(cfg)
    cfg, task, data, splits = inputs.cfg, inputs.task, inputs.data, inputs.splits
    out_dir = cfg.output_dir or ctx.dir
    out = Storage.parse(out_dir)  # a local folder or a URI: every output goes through it
    out.write_text(SPLITS_FILE, inputs.splits_json())
    init_ray(cfg.run)
    threads = threads_per_worker(cfg.scaling)
    spec = DownstreamSpec(
        cfg=cfg, base_path=inputs.base_path, train=data.take(splits.train), dev=data.take(splits.dev),
        test=data.take(splits.test),
        task_type=task.task_type, ordinal=task.ordinal, out_dir=out.uri, threads=threads,
    )
    trainer = build_trainer(downstream_worker, {"spec": spec}, scaling=cfg.scaling, ctx=ctx, threads=threads,
                            keep_checkpoints=cfg.checkpoint.keep)
    result = fit(trainer)
    metrics = result.return_value
    lo, hi = metrics["auroc_macro_ci"]
    print(f"\n{task.name} ({cfg.setting}): test macro AUROC {metrics['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}] "
          f"on {metrics['n']} items (best dev AUROC {metrics['best_dev_auroc']:.4f} at epoch "
          f"{metrics['best_epoch']}), accuracy {metrics['accuracy']:.4f}, "
          f"trainable {metrics['trainable']:,} of {metrics['total']:,}")
    print(f"classifier:  {out_dir}/adapter  (evaluate.py classify and the Serve app load it)")
    print(f"metrics:     {out_dir}/metrics.json  predictions: {out_dir}/predictions.jsonl  "
          f"splits: {out_dir}/splits.json  plot: {out_dir}/plots/epochs.png")
    return FinetuneOutputs(run_dir=ctx.dir, stage="downstream", adapter_dir=f"{out_dir}/adapter", metrics=metrics,
                           history=metrics["history"])
