"""The continued-pretraining driver: corpus → packed mixture → Ray Train + DeepSpeed → HF model.

The driver plans, and the cluster does the data work (:func:`prepare_data`): Ray Data
read tasks parse the sources, hold out a stable fraction of each source's documents,
tokenize and pack them; a task trains the tokenizer on a sample; the sources are mixed
by weight and the shuffled, materialized dataset (in the object store) goes to the
trainer of :mod:`ray_med.training.trainer` running
:func:`~ray_med.training.pretrain_worker.pretrain_worker`. The run's name and storage
come from :mod:`ray_med.runtime`, so resubmitting the job resumes from its latest
checkpoint; ``FailureConfig`` restarts the workers from it after a failure.

:func:`train_lm` is shared with the domain-adapter stage of fine-tuning, which is this
same training with an adapter over a frozen model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from ray_med.adapters.config import AdapterConfig
from ray_med.corpus.build import (
    READ_BLOCK_RECORDS,
    corpus_dataset,
    documents,
    on_storage_node,
    ordered_datasets,
    train_tokenizer,
    union,
    user_errors,
)
from ray_med.data import Packer, tokenize_texts
from ray_med.data.config import resolve_path
from ray_med.data.mixture import mixture_counts
from ray_med.errors import ConfigError, DataError, ModelError
from ray_med.models import load_config, load_tokenizer
from ray_med.runtime import RunContext, init_ray, localize, ray_get
from ray_med.training.config import PretrainConfig, PretrainOutputs
from ray_med.training.preflight import check_adapter, check_batches, meta_model
from ray_med.training.pretrain_worker import TIMINGS, WorkerSpec, pretrain_worker
from ray_med.training.trainer import build_trainer, fit, threads_per_worker

log = logging.getLogger("ray_med.pretrain")
"""The driver's logger; a stage that reuses :func:`train_lm` logs under its own name (ray_med.domain)."""


def _pack_batch(batch: pa.Table, tokenizer: Any, seq_len: int) -> dict[str, np.ndarray]:
    """Each source's documents in the block, tokenized and packed into ``seq_len`` blocks of that source.

    A block may be a whole file, so documents are tokenized :data:`READ_BLOCK_RECORDS` at a
    time into a stream packer: the token lists of the whole block never exist at once.
    """
    sources, texts = batch.column("source").to_pylist(), batch.column("text").to_pylist()
    names: list[str] = []
    blocks = [np.zeros((0, seq_len), np.int32)]
    for name in dict.fromkeys(sources):  # a read block holds one file's records: one source
        docs = [t for t, s in zip(texts, sources, strict=True) if s == name and t]
        packer = Packer(seq_len)
        for i in range(0, len(docs), READ_BLOCK_RECORDS):
            # int32 halves what the object store holds; vocabularies are far below 2**31.
            out = packer.add(tokenize_texts(tokenizer, docs[i : i + READ_BLOCK_RECORDS])).astype(np.int32)
            names += [name] * len(out)
            blocks.append(out)
    return {"source": np.array(names, dtype=str), "input_ids": np.concatenate(blocks)}


def _count_sources(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names, counts = np.unique(batch["source"].astype(str), return_counts=True)
    return {"source": names.astype(object), "n": counts}


_SHUFFLE_PIECE_BYTES = 256 * 1024
"""The smallest piece the shuffle should make: above Ray's inline limit (``max_direct_call_object_size``, 100 KiB)."""


def _shuffle_blocks(size_bytes: int, blocks: int) -> int:
    """How many blocks to shuffle ``size_bytes`` in: at most ``blocks``, and each of the n x n pieces large."""
    return max(1, min(blocks, math.isqrt(max(0, size_bytes) // _SHUFFLE_PIECE_BYTES)))


def _resample(ds: Any, have: int, want: int, seed: int) -> Any:
    """``want`` rows from a dataset of ``have``: whole copies, then a seeded sample of the rest."""
    if want == have:
        return ds
    parts = [ds] * (want // have)
    rest = want - have * (want // have)
    if rest:
        parts.append(ds.random_shuffle(seed=seed).limit(rest))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def run_tokenizer(cfg: PretrainConfig, ctx: RunContext, train_docs: Any) -> Any:
    """The run's own tokenizer: the one a resumed run saved completely, else one trained now.

    It trains in a Ray task on a seeded sample of ``train_docs`` (at most
    ``tokenizer.sample_documents``); the driver only saves what comes back.
    """
    if ctx.complete("tokenizer"):
        return load_tokenizer(localize(ctx.path("tokenizer"), what="tokenizer folder", error=ModelError))
    tokenizer, _ = train_tokenizer(train_docs, sample_documents=cfg.tokenizer.sample_documents, seed=cfg.run.seed,
                                   vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency)
    with ctx.local_dir("tokenizer") as tok_dir:
        tokenizer.save_pretrained(str(tok_dir))
    return tokenizer


# num_cpus=0: it mostly waits on the read tasks feeding it (see corpus.build's consumers).
@ray.remote(num_cpus=0)
def _heldout_task(docs: Any, storage: Any, run_name: str, names: list[str], tokenizer: Any, seq_len: int,
                  max_sequences: int) -> dict[str, tuple[int, np.ndarray]]:
    """Streams the held-out documents into ``heldout/<source>.jsonl``; returns (documents, eval blocks) per source.

    Only the first ``max_sequences`` blocks of each source are tokenized and kept: they
    are what the workers evaluate on, the same blocks ``pack`` of all its documents starts with.
    """
    packers = {n: Packer(seq_len) for n in names}
    blocks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    counts = dict.fromkeys(names, 0)
    with user_errors(), contextlib.ExitStack() as stack:
        outs = {n: stack.enter_context(storage.open_output(f"{run_name}/heldout/{n}.jsonl")) for n in names}
        for batch in docs.iter_batches(batch_format="pyarrow", batch_size=None):
            rows = zip(batch["id"].to_pylist(), batch["source"].to_pylist(), batch["text"].to_pylist(), strict=True)
            pending: dict[str, list[str]] = {}
            for rid, src, text in rows:
                outs[src].write((json.dumps({"id": rid, "text": text}) + "\n").encode("utf-8"))
                counts[src] += 1
                if sum(len(b) for b in blocks[src]) < max_sequences:
                    pending.setdefault(src, []).append(text)
            for src, texts in pending.items():
                blocks[src].append(packers[src].add(tokenize_texts(tokenizer, texts)))
    return {n: (counts[n], np.concatenate([np.zeros((0, seq_len), np.int64), *blocks[n]])[:max_sequences])
            for n in names}


def prepare_data(cfg: PretrainConfig, ctx: RunContext) -> tuple[Any, dict[str, np.ndarray], Any, dict[str, Any]]:
    """(train dataset, held-out blocks per source, tokenizer, data stats); the corpus never reaches the driver.

    Ray Data read tasks parse the sources (:func:`~ray_med.corpus.build.source_dataset`);
    the held-out split (:func:`~ray_med.data.mixture.is_heldout`, by document id), the
    tokenization and the packing run in those tasks; a task trains the tokenizer on a
    sample of the training split, and another writes ``heldout/<source>.jsonl`` and
    returns the first ``eval.max_sequences`` blocks per source. The packed sequences are
    materialized in the object store, mixed by weight and shuffled there; the driver
    holds paths, counts, the tokenizer and the small evaluation blocks.
    """
    seq_len, seed, fraction = cfg.train.seq_len, cfg.run.seed, cfg.eval.heldout_fraction
    names = [s.name for s in cfg.corpus.sources]
    with ordered_datasets(), user_errors():
        records = corpus_dataset(cfg.corpus)
        train_docs = documents(records, heldout=False, fraction=fraction, seed=seed)
        held_docs = documents(records, heldout=True, fraction=fraction, seed=seed)

        if cfg.model.path:
            tokenizer = load_tokenizer(localize(cfg.model.path, what="model folder", error=ModelError))
        elif cfg.tokenizer.path:
            tokenizer = load_tokenizer(localize(resolve_path(cfg.tokenizer.path), what="tokenizer folder",
                                                error=ModelError))
        else:
            tokenizer = run_tokenizer(cfg, ctx, train_docs)

        # The held-out file and blocks are made while the training split is packed.
        held_ref = _heldout_task.options(**on_storage_node(ctx.storage)).remote(
            held_docs, ctx.storage, ctx.name, names, tokenizer, seq_len, cfg.eval.max_sequences)
        packed = train_docs.map_batches(
            _pack_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len},
        ).materialize()
        # Counted per block, in block order: the union keeps the sources' order, so each
        # source's sequences are one contiguous range of the materialized dataset.
        rows = packed.map_batches(_count_sources, batch_format="numpy", batch_size=None).take_all()
        order = [r["source"] for r in rows]
        if order != sorted(order, key=names.index):
            raise RuntimeError(f"packed blocks are not in source order: {order}")  # a bug, not user input
        sizes = dict.fromkeys(names, 0)
        for row in rows:
            sizes[row["source"]] += int(row["n"])
        weights = {s.name: s.weight for s in cfg.corpus.sources}
        counts = mixture_counts(sizes, weights)
        if not any(counts[n] > 0 and sizes[n] > 0 for n in names):
            raise DataError(f"no source has a full {seq_len}-token sequence to train on (sequences per source: {sizes})")
        mixed = packed
        if counts != sizes:
            # Split by row ranges, not filtered per source: a filter per source would make
            # sources x blocks blocks, and the shuffle's driver-side bookkeeping grows with their square.
            bounds = list(itertools.accumulate(sizes[n] for n in names))[:-1]
            pieces = dict(zip(names, packed.split_at_indices(bounds) if bounds else [packed], strict=True))
            mixed = union([_resample(pieces[n], sizes[n], counts[n], seed)
                           for n in names if counts[n] > 0 and sizes[n] > 0])
        # The shuffle cuts each of its n input blocks into n pieces, and Ray keeps a task's
        # small results (under 100 KiB) in the memory of their owner, the driver: so few
        # enough blocks that the pieces stay large and go to the object store.
        blocks = _shuffle_blocks(packed.size_bytes(), packed.num_blocks())
        train = mixed.select_columns(["input_ids"]).repartition(blocks).random_shuffle(seed=seed).materialize()
        held = ray_get(held_ref)

    eval_blocks = {name: blocks for name, (_, blocks) in held.items() if len(blocks)}
    total = sum(counts.values())
    stats = {
        name: {
            "train_sequences": sizes[name],
            "mixture_sequences": counts[name],
            "mixture_share": counts[name] / total if total else 0.0,
            "heldout_documents": held[name][0],
            "heldout_sequences": int(len(eval_blocks.get(name, ()))),
        }
        for name in names
    }
    return train, eval_blocks, tokenizer, stats


def train_lm(cfg: PretrainConfig, ctx: RunContext, *, adapter: AdapterConfig | None = None,
             name: str = "pretrain") -> tuple[Any, list[dict[str, Any]]]:
    """Train a causal LM (or only ``adapter`` over it) on ``cfg.corpus``: (Ray Train's Result, the history).

    The model (or adapter) goes to ``<output_dir>/model`` (``<output_dir>/adapter``),
    the run folder by default, with ``metrics.json`` and ``plots/loss.png``. ``name``
    prefixes the progress lines ([pretrain], [domain]) and names the driver's logger.
    """
    started = time.time()  # time_to_first_step_s counts from here: the job's config is loaded, its run started
    stage_log = logging.getLogger(f"ray_med.{name}")
    cfg.corpus.check()
    if cfg.model.path and cfg.tokenizer.path:
        raise ConfigError("tokenizer.path is for presets: the model at model.path brings its own tokenizer")
    # Before any data is read or worker started: the model folder exists and the adapter fits it
    # (one in remote storage is downloaded once, into runtime.localize's cache).
    local = cfg.model.path and localize(cfg.model.path, what="model folder", error=ModelError)
    if adapter is not None:
        check_adapter(meta_model(dataclasses.replace(cfg.model, path=local or None)), adapter)
    elif local:
        load_config(local)
    init_ray(cfg.run)
    train_ds, eval_blocks, tokenizer, stats = prepare_data(cfg, ctx)
    check_batches(sum(st["mixture_sequences"] for st in stats.values()), batch_size=cfg.train.micro_batch_size,
                  workers=cfg.scaling.num_workers, what="the training mixture",
                  unit=f"{cfg.train.seq_len}-token sequences", fix="lower train.micro_batch_size or train.seq_len, or add data")
    for source, st in stats.items():
        stage_log.info("source %s: %d train sequences, %d in the mixture (%.1f%%), %d held-out sequences",
                 source, st["train_sequences"], st["mixture_sequences"], 100 * st["mixture_share"],
                 st["heldout_sequences"])
    ctx.write_text("data_stats.json", json.dumps(stats, indent=2) + "\n")
    threads = threads_per_worker(cfg.scaling)
    spec = WorkerSpec(
        model=cfg.model, vocab_size=len(tokenizer), train=cfg.train, optim=cfg.optim, deepspeed=cfg.deepspeed,
        checkpoint=cfg.checkpoint, eval=cfg.eval, use_gpu=cfg.scaling.use_gpu, threads=threads,
        seed=cfg.run.seed, run_name=ctx.name, name=name, eval_blocks=eval_blocks,
        export_dir=cfg.output_dir or ctx.dir, tokenizer=tokenizer, metrics_dir=ctx.dir, adapter=adapter,
        started=started,
    )
    trainer = build_trainer(pretrain_worker, {"spec": spec}, scaling=cfg.scaling, ctx=ctx, threads=threads,
                            keep_checkpoints=cfg.checkpoint.keep, datasets={"train": train_ds})
    result = fit(trainer)
    return result, list(result.return_value or [])


def timings(history: list[dict[str, Any]]) -> dict[str, float]:
    """time_to_first_step_s and checkpoint_save_s of the run (the worker adds them to the last row)."""
    last = history[-1] if history else {}
    return {k: last[k] for k in TIMINGS if last.get(k) is not None}


def timing_line(times: dict[str, float]) -> str:
    """The summary's line of the two timings."""
    first = times.get("time_to_first_step_s")
    return (f"timings:     first step {'n/a' if first is None else f'{first:.1f} s'} after the job started, "
            f"{times.get('checkpoint_save_s', 0.0):.2f} s saving checkpoints")


def run_pretrain(cfg: PretrainConfig, ctx: RunContext) -> PretrainOutputs:
    """Run (or resume) continued pretraining; print where the model and metrics went."""
    result, history = train_lm(cfg, ctx)
    model_dir = f"{(cfg.output_dir or ctx.dir).rstrip('/')}/model"
    # Local mode (num_workers=0) returns no run folder and keeps no checkpoint.
    checkpoint = result.checkpoint.path if result.checkpoint is not None and result.path else None
    metrics = {**(result.metrics or {}), **timings(history)}
    print(f"\npretraining finished at step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}")
    print(f"model:       {model_dir}  (an HF folder: transformers' AutoModelForCausalLM loads it)")
    print(f"metrics:     {ctx.path('metrics.json')}  plot: {ctx.path('plots', 'loss.png')}")
    print(f"checkpoint:  {checkpoint or 'none (scaling.num_workers=0: local mode keeps no checkpoints)'}")
    print(timing_line(metrics))
    return PretrainOutputs(run_dir=ctx.dir, model_dir=model_dir, metrics=metrics, checkpoint=checkpoint,
                           history=history)
