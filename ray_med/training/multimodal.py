"""The multimodal job (Med-PaLM M-style) on Ray Train: the driver of ``jobs/multimodal.py`` and its worker shell.

The driver checks the config and the files, then starts one Ray task that reads every
task's records, holds out dev (a seeded, stratified share of each task's training
items), builds the examples (instruction, one-shot exemplar, ``<image>``) and, for a
preset, trains the BPE tokenizer on their text. The examples stay in the object store:
the driver passes their reference to the workers and never holds them.

Each worker builds the same model (:func:`ray_med.models.vlm.build_vlm`, the phase's
weights trainable), encodes the examples, and trains with
:func:`ray_med.training.vlm.train_vlm` (DDP across workers, the task-mixture plan
sharded by rank, checkpoints with the loop state every epoch). Rank 0 then scores the
held-out ``eval`` files once (never trained or selected on), and writes
``<output_dir>/model`` (an HF LLaVA folder with tokenizer and processor, LoRA merged),
``metrics.json`` and ``predictions_<task>.jsonl``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train.torch
import torch
from ray.train.torch import prepare_model

from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.data.task_mixture import MixtureSettings
from ray_med.errors import ConfigError, DataError
from ray_med.evaluation.multimodal import ModelGeometry, Pixels, prepare, score_task
from ray_med.models import load_tokenizer, train_bpe_tokenizer
from ray_med.models.presets import count_parameters
from ray_med.models.vlm import add_image_token, build_vlm, is_vlm_folder, save_vlm, set_phase
from ray_med.runtime import RunContext, Storage, init_ray, localize, ray_get, seed_everything
from ray_med.tasks import get_multimodal_task
from ray_med.tasks.instructions import Example, make_example
from ray_med.training.multimodal_config import (
    EvalSource,
    MultimodalConfig,
    MultimodalOutputs,
    TaskSource,
    source_options,
)
from ray_med.training.trainer import build_trainer, fit, threads_per_worker
from ray_med.training.vlm import split_dev, train_vlm
from ray_med.training.worker import RayCheckpoints, reduce_mean, say, test_fault, worker_info

TOKENIZER_DIR = "tokenizer"


def _path(cfg: MultimodalConfig, path: str) -> str:
    if not path.startswith("pkg://") and not Path(path).expanduser().is_absolute() and "://" not in path:
        path = str(Path(cfg.data_root) / path)
    return resolve_path(path)


def read_examples(src: TaskSource | EvalSource, path: str, seed: int, split: str) -> list[Example]:
    """The examples of one task file (its ``split`` by default; a seeded sample of ``limit`` items when set)."""
    task = get_multimodal_task(src.task)
    records = read_records(src.reader or task.reader, localize(path, what="data file", error=DataError),
                           options=source_options(src, split) or None).records
    if src.limit is not None and src.limit < len(records):
        keep = sorted(np.random.default_rng(seed).choice(len(records), src.limit, replace=False).tolist())
        records = [records[i] for i in keep]
    if not records:
        raise DataError(f"{src.task}: {path} holds no items")
    return [make_example(task, r) for r in records]


def prepare_data(cfg: MultimodalConfig, out_uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, data): runs as one Ray task; the data stays in the object store."""
    seed = cfg.run.seed
    train: dict[str, list[Example]] = {}
    dev: dict[str, list[Example]] = {}
    for src in cfg.tasks:
        examples = read_examples(src, _path(cfg, src.path), seed, "train")
        labels = [e.gold for e in examples] if examples[0].gold is not None else None
        tr, dv = split_dev(examples, labels, cfg.train.dev_fraction, seed, cfg.train.dev_max_items)
        train[src.task] = [examples[i] for i in tr]
        dev[src.task] = [examples[i] for i in dv]
    evals = {src.task: read_examples(src, _path(cfg, src.path), seed, "val") for src in cfg.eval}
    tokenizer_dir = None
    if not cfg.model.path and not cfg.model.language_model:
        # A preset has no tokenizer: train one on the text the model will read.
        texts = (f"{e.prompt} {e.target}" for items in train.values() for e in items)
        out = Storage.parse(out_uri)
        with out.local_dir(TOKENIZER_DIR) as folder:
            tok = train_bpe_tokenizer(texts, vocab_size=cfg.tokenizer.vocab_size,
                                      min_frequency=cfg.tokenizer.min_frequency)
            add_image_token(tok)
            tok.save_pretrained(str(folder))
        tokenizer_dir = out.join(TOKENIZER_DIR)
    summary = {"train": {t: len(v) for t, v in train.items()}, "dev": {t: len(v) for t, v in dev.items()},
               "eval": {t: len(v) for t, v in evals.items()}, "tokenizer_dir": tokenizer_dir}
    return summary, {"train": train, "dev": dev, "eval": evals}


@dataclass
class WorkerSpec:
    cfg: MultimodalConfig
    data: Any
    """ObjectRef of prepare_data's data (a list holding it, so Ray passes the reference, not the value)."""
    tokenizer_dir: str
    out_dir: str
    threads: int


def _tokenizer(path: str) -> Any:
    tok = load_tokenizer(localize(path))
    add_image_token(tok)
    return tok


def multimodal_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train ``train_loop_per_worker``; rank 0 returns the held-out metrics."""
    spec: WorkerSpec = config["spec"]
    cfg = spec.cfg
    torch.set_num_threads(spec.threads)
    seed_everything(cfg.run.seed)
    info = worker_info()
    rank, world = info.rank, info.world
    data = ray.get(spec.data[0])
    tokenizer = _tokenizer(spec.tokenizer_dir)
    model_cfg = cfg.model
    if model_cfg.path:
        model_cfg = type(model_cfg)(**{**model_cfg.__dict__, "path": localize(model_cfg.path)})
    if model_cfg.language_model:
        model_cfg = type(model_cfg)(**{**model_cfg.__dict__, "language_model": localize(model_cfg.language_model)})
    base = build_vlm(model_cfg, tokenizer).to(ray.train.torch.get_device())  # this worker's GPU, or the CPU
    geo = ModelGeometry.of(base.config)
    model = set_phase(base, cfg.model.phase, cfg.model.lora)
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    t_max = cfg.train.max_length

    def encode(split: dict[str, list[Example]]) -> dict[str, list[Any]]:
        return {task: [prepare(tokenizer, ex, geo, t_max) for ex in items] for task, items in split.items()}

    train, dev = encode(data["train"]), encode(data["dev"])
    pixels = Pixels(geo.spec)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ratios = {s.task: s.ratio for s in cfg.tasks if s.ratio is not None} or None
    upsample = {s.task: s.upsample for s in cfg.tasks if s.upsample != 1.0} or None
    mixture = MixtureSettings(ratios=ratios, min_per_task_per_batch=cfg.mixture.min_per_task_per_batch,
                              upsample=upsample)

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        return prepare_model(m, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})

    if rank == 0:
        say(f"[multimodal] {cfg.model.phase}: trainable {trainable:,} of {total:,} parameters; "
            f"{geo.n_image_tokens} image tokens of {geo.spec.size}px; train {({t: len(v) for t, v in train.items()})}")
    t0 = time.perf_counter()
    result = train_vlm(
        model, train, dev, cfg.train, mixture, pixels=pixels, pad_id=pad, seed=cfg.run.seed, shard_of=(rank, world),
        wrap=wrap if world > 1 else None, checkpoints=RayCheckpoints(rank), reduce_mean=reduce_mean(world),
        log=say if rank == 0 else lambda _: None, on_step=test_fault(cfg.train.fail_at_step, "multimodal", rank, world),
    )
    train_s = time.perf_counter() - t0
    if rank != 0:
        return None
    out = Storage.parse(spec.out_dir)
    metrics: dict[str, Any] = {k: v for k, v in result.items() if k != "history"}
    metrics.update(trainable=trainable, total=total, train_s=train_s, phase=cfg.model.phase, workers=world,
                   n_train={t: len(v) for t, v in train.items()}, n_dev={t: len(v) for t, v in dev.items()})
    metrics["eval"] = {}
    for src in cfg.eval:
        task = get_multimodal_task(src.task)
        m, preds = score_task(model, tokenizer, task, data["eval"][src.task], geo, max_length=t_max,
                              bootstrap=cfg.bootstrap, seed=cfg.run.seed, pixels=pixels,
                              max_new_tokens=src.max_new_tokens)
        metrics["eval"][src.task] = m
        out.write_text(f"predictions_{src.task}.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    with out.local_dir("model") as folder:
        save_vlm(model, tokenizer, folder)
    out.write_text("metrics.json", json.dumps({**metrics, "history": result["history"]}, indent=2, default=float) + "\n")
    metrics["history"] = result["history"]
    return metrics


def check_config(cfg: MultimodalConfig) -> None:
    """What can be checked before any worker starts: files, folders, batch sizes."""
    for src in [*cfg.tasks, *cfg.eval]:
        path = _path(cfg, src.path)
        if "://" not in path and not Path(path).exists():
            raise DataError(f"{src.task}: data file not found: {path}")
    if cfg.model.path and not is_vlm_folder(localize(resolve_path(cfg.model.path), what="model folder")):
        raise ConfigError(f"model.path {cfg.model.path}: not a multimodal (LLaVA) model folder; to put a causal LM "
                          "under a vision tower set model.language_model instead")
    if cfg.train.batch_size < cfg.mixture.min_per_task_per_batch * len(cfg.tasks):
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} cannot hold mixture.min_per_task_per_batch "
                          f"{cfg.mixture.min_per_task_per_batch} of each of {len(cfg.tasks)} tasks")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def run_multimodal(cfg: MultimodalConfig, ctx: RunContext) -> MultimodalOutputs:
    """Prepare the data on the cluster, train on Ray Train, print the held-out metrics."""
    check_config(cfg)
    init_ray(cfg.run)
    out_dir = cfg.output_dir or ctx.dir
    out = Storage.parse(out_dir)
    summary_ref, data_ref = ray.remote(prepare_data).options(num_returns=2, num_cpus=1).remote(cfg, out.uri)
    summary = ray_get(summary_ref)
    train_n = sum(summary["train"].values())
    if train_n // cfg.train.batch_size < max(1, cfg.scaling.num_workers):
        raise DataError(f"{train_n} training items make fewer than one batch of {cfg.train.batch_size} per worker; "
                        "lower train.batch_size or scaling.num_workers")
    tokenizer_dir = summary["tokenizer_dir"] or resolve_path(cfg.model.path or cfg.model.language_model)
    print(f"[multimodal] data: train {summary['train']} dev {summary['dev']} held-out {summary['eval']}")
    threads = threads_per_worker(cfg.scaling)
    spec = WorkerSpec(cfg=cfg, data=[data_ref], tokenizer_dir=tokenizer_dir, out_dir=out.uri, threads=threads)
    trainer = build_trainer(multimodal_worker, {"spec": spec}, scaling=cfg.scaling, ctx=ctx, threads=threads,
                            keep_checkpoints=cfg.checkpoint.keep)
    metrics = fit(trainer).return_value
    print(f"\nmultimodal ({cfg.model.phase}) finished after {metrics['steps']} steps in {metrics['train_s']:.0f}s: "
          f"best {metrics['monitor']} {_num(metrics['best_dev'])} (step {metrics['best_step']})")
    for task, m in metrics["eval"].items():
        if "auroc_macro" in m:
            lo, hi = m["auroc_macro_ci"]
            print(f"{task} held-out: macro AUROC {m['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}], macro F1 "
                  f"{m['f1_macro']:.4f}, accuracy {m['accuracy']:.4f} on {m['n']} items")
        else:
            print(f"{task} held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "n") + f" on {m['n']}")
    print(f"model:   {out_dir}/model  (LlavaForConditionalGeneration / AutoModelForImageTextToText)")
    print(f"metrics: {out_dir}/metrics.json")
    return MultimodalOutputs(run_dir=ctx.dir, model_dir=f"{out_dir}/model", metrics=metrics,
                             history=metrics.get("history", []))
