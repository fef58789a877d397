"""Two-stage adapter fine-tuning (Clinical LLaMA-LoRA) on Ray Train: the driver of ``jobs/finetune.py``.

* ``stage: domain`` trains one adapter (any registered method) as a causal LM on a
  corpus of clinical notes, over a frozen base. It is pretraining's training
  (:func:`~ray_med.training.pretrain.train_lm`: the same worker, the same held-out
  perplexity) with an adapter, and writes the adapter in PEFT format to
  ``<output_dir>/adapter``.
* ``stage: downstream`` trains a classifier: the base, the stage-1 adapter (optional;
  frozen or trainable), a new downstream adapter (optional) and a head, on a task's
  stratified train split, early-stopping on dev macro AUROC
  (:mod:`~ray_med.training.downstream_worker`). It writes ``<output_dir>/adapter`` (the
  classifier folder, :mod:`ray_med.adapters.classifier`), ``metrics.json`` (AUROC,
  AUPRC, macro F1 and accuracy with bootstrap CIs), ``predictions.jsonl`` and
  ``plots/epochs.png``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from ray_med.adapters.registry import check_adapter_dir
from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.errors import ConfigError
from ray_med.models import load_config
from ray_med.runtime import RunContext, init_ray
from ray_med.tasks import get_task, stratified_split, task_data
from ray_med.training.config import FinetuneConfig, FinetuneOutputs, PretrainConfig
from ray_med.training.downstream_worker import DownstreamSpec, downstream_worker
from ray_med.training.pretrain import train_lm
from ray_med.training.trainer import build_trainer, threads_per_worker

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
    metrics = dict(result.metrics or {})
    adapter_dir = f"{(cfg.output_dir or ctx.dir).rstrip('/')}/adapter"
    print(f"\ndomain adaptation finished at step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}")
    print(f"domain adapter: {adapter_dir}  (PEFT format: adapter_config.json + adapter_model.safetensors)")
    print(f"metrics:     {ctx.path('metrics.json')}  plot: {ctx.path('plots', 'loss.png')}")
    return FinetuneOutputs(run_dir=ctx.dir, stage="domain", adapter_dir=adapter_dir, metrics=metrics,
                           history=history)


def _run_downstream(cfg: FinetuneConfig, ctx: RunContext) -> FinetuneOutputs:
    task = get_task(cfg.data.task)
    if not cfg.model.path:
        raise ConfigError("downstream: set model.path to the base model folder (a preset has no trained weights)")
    base_path = resolve_path(cfg.model.path)
    # Check the folders here, before any worker starts: a typo should be one line, not a
    # worker-group traceback minutes later.
    load_config(base_path)
    if cfg.domain_adapter:
        check_adapter_dir(cfg.domain_adapter)
    data_path = cfg.data.path
    if not data_path.startswith("pkg://") and not Path(data_path).expanduser().is_absolute():
        data_path = str(Path(cfg.data.root) / data_path)
    data_path = resolve_path(data_path)
    records = read_records(cfg.data.reader or task.reader, data_path, on_error=cfg.data.on_error).records
    data = task_data(task, records)
    train_idx, dev_idx = stratified_split(data.y, cfg.data.dev_size, seed=cfg.run.seed)
    out_dir = cfg.output_dir or ctx.dir
    if "://" in out_dir:
        raise ConfigError("downstream: output_dir must be a local or shared-filesystem path for now")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    init_ray(cfg.run)
    threads = threads_per_worker(cfg.scaling)
    spec = DownstreamSpec(
        cfg=cfg, base_path=base_path, train=data.take(train_idx), dev=data.take(dev_idx),
        task_type=task.task_type, ordinal=task.ordinal, out_dir=str(Path(out_dir).resolve()), threads=threads,
    )
    trainer = build_trainer(downstream_worker, {"spec": spec}, scaling=cfg.scaling, ctx=ctx, threads=threads,
                            keep_checkpoints=cfg.checkpoint.keep)
    result = trainer.fit()
    metrics = result.return_value
    lo, hi = metrics["auroc_macro_ci"]
    print(f"\n{task.name} ({cfg.setting}): dev macro AUROC {metrics['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}], "
          f"accuracy {metrics['accuracy']:.4f}, trainable {metrics['trainable']:,} of {metrics['total']:,}")
    print(f"classifier:  {out_dir}/adapter  (evaluate.py classify and the Serve app load it)")
    print(f"metrics:     {out_dir}/metrics.json  predictions: {out_dir}/predictions.jsonl  "
          f"plot: {out_dir}/plots/epochs.png")
    return FinetuneOutputs(run_dir=ctx.dir, stage="downstream", adapter_dir=f"{out_dir}/adapter", metrics=metrics,
                           history=metrics["history"])
