"""The continued-pretraining driver: corpus → packed mixture → Ray Train + DeepSpeed → HF model.

The driver reads the sources with Ray tasks, holds out a stable fraction of each
source's documents, trains (or loads) the tokenizer, tokenizes and packs each source
with Ray Data, mixes the sources by weight, and hands the materialized dataset to the
trainer of :mod:`ray_med.training.trainer` running
:func:`~ray_med.training.pretrain_worker.pretrain_worker`. The run's name and storage
come from :mod:`ray_med.runtime`, so resubmitting the job resumes from its latest
checkpoint; ``FailureConfig`` restarts the workers from it after a failure.

:func:`train_lm` is shared with the domain-adapter stage of fine-tuning, which is this
same training with an adapter over a frozen model.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_med.adapters.config import AdapterConfig
from ray_med.corpus.build import read_corpus, to_ray_dataset
from ray_med.data import pack, tokenize_texts
from ray_med.data.config import resolve_path
from ray_med.data.mixture import mixture_counts, split_heldout
from ray_med.errors import ConfigError, DataError
from ray_med.models import load_tokenizer, train_bpe_tokenizer
from ray_med.runtime import RunContext, init_ray
from ray_med.training.config import PretrainConfig, PretrainOutputs
from ray_med.training.pretrain_worker import WorkerSpec, pretrain_worker
from ray_med.training.trainer import build_trainer, threads_per_worker

log = logging.getLogger("ray_med.pretrain")


def _pack_batch(batch: pa.Table, tokenizer: Any, seq_len: int) -> dict[str, np.ndarray]:
    texts = [t for t in batch.column("text").to_pylist() if t]
    blocks = pack(tokenize_texts(tokenizer, texts), seq_len) if texts else np.zeros((0, seq_len), np.int64)
    # int32 halves what the object store holds; vocabularies are far below 2**31.
    return {"input_ids": blocks.astype(np.int32)}


def _resample(ds: Any, have: int, want: int, seed: int) -> Any:
    """``want`` rows from a dataset of ``have``: whole copies, then a seeded sample of the rest."""
    if want == have:
        return ds
    parts = [ds] * (want // have)
    rest = want - have * (want // have)
    if rest:
        parts.append(ds.random_shuffle(seed=seed).limit(rest))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def prepare_data(cfg: PretrainConfig, ctx: RunContext) -> tuple[Any, dict[str, np.ndarray], Any, dict[str, Any]]:
    """(train dataset, held-out blocks per source, tokenizer, data stats)."""
    seq_len, seed = cfg.train.seq_len, cfg.run.seed
    sources = read_corpus(cfg.corpus)
    train_tables, held_texts = {}, {}
    for name, data in sources.items():
        table = data.table.select(["id", "source", "text"])
        table = table.filter(pc.not_equal(table["text"], ""))
        train_idx, held_idx = split_heldout(table["id"].to_pylist(), name, cfg.eval.heldout_fraction, seed)
        train_tables[name] = table.take(train_idx)
        held = table.take(held_idx)
        held_texts[name] = held["text"].to_pylist()
        # The held-out documents are written out so `jobs/evaluate.py perplexity` can score them later.
        ctx.write_text(
            f"heldout/{name}.jsonl",
            "".join(json.dumps({"id": i, "text": t}) + "\n"
                    for i, t in zip(held["id"].to_pylist(), held_texts[name], strict=True)),
        )

    if cfg.model.path:
        tokenizer = load_tokenizer(cfg.model.path)
    elif cfg.tokenizer.path:
        tokenizer = load_tokenizer(resolve_path(cfg.tokenizer.path))
    else:
        with ctx.local_dir("tokenizer") as tok_dir:
            if (tok_dir / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(str(tok_dir))  # a resumed run keeps its tokenizer
            else:
                texts = (t for tb in train_tables.values() for t in tb["text"].to_pylist())
                tokenizer = train_bpe_tokenizer(
                    texts, vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency,
                    out_dir=tok_dir,
                )

    packed, sizes = {}, {}
    for name, table in train_tables.items():
        ds = to_ray_dataset(table).map_batches(
            _pack_batch, batch_format="pyarrow", batch_size=256,
            fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len},
        ).materialize()
        packed[name], sizes[name] = ds, ds.count()
    weights = {s.name: s.weight for s in cfg.corpus.sources}
    counts = mixture_counts(sizes, weights)
    parts = [_resample(packed[n], sizes[n], counts[n], seed) for n in packed if counts[n] > 0 and sizes[n] > 0]
    if not parts:
        raise DataError(f"no source has a full {seq_len}-token sequence to train on (sequences per source: {sizes})")
    train = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    train = train.random_shuffle(seed=seed).materialize()

    eval_blocks = {}
    for name, texts in held_texts.items():
        blocks = pack(tokenize_texts(tokenizer, texts), seq_len)[: cfg.eval.max_sequences] if texts else None
        if blocks is not None and len(blocks):
            eval_blocks[name] = blocks
    total = sum(counts.values())
    stats = {
        name: {
            "train_sequences": sizes[name],
            "mixture_sequences": counts[name],
            "mixture_share": counts[name] / total if total else 0.0,
            "heldout_documents": len(held_texts[name]),
            "heldout_sequences": int(len(eval_blocks.get(name, ()))),
        }
        for name in sizes
    }
    return train, eval_blocks, tokenizer, stats


def train_lm(cfg: PretrainConfig, ctx: RunContext, *, adapter: AdapterConfig | None = None,
             name: str = "pretrain") -> tuple[Any, list[dict[str, Any]]]:
    """Train a causal LM (or only ``adapter`` over it) on ``cfg.corpus``: (Ray Train's Result, the history).

    The model (or adapter) goes to ``<output_dir>/model`` (``<output_dir>/adapter``),
    the run folder by default, with ``metrics.json`` and ``plots/loss.png``.
    """
    cfg.corpus.check()
    if cfg.model.path and cfg.tokenizer.path:
        raise ConfigError("tokenizer.path is for presets: the model at model.path brings its own tokenizer")
    init_ray(cfg.run)
    train_ds, eval_blocks, tokenizer, stats = prepare_data(cfg, ctx)
    for source, st in stats.items():
        log.info("source %s: %d train sequences, %d in the mixture (%.1f%%), %d held-out sequences",
                 source, st["train_sequences"], st["mixture_sequences"], 100 * st["mixture_share"],
                 st["heldout_sequences"])
    ctx.write_text("data_stats.json", json.dumps(stats, indent=2) + "\n")
    threads = threads_per_worker(cfg.scaling)
    spec = WorkerSpec(
        model=cfg.model, vocab_size=len(tokenizer), train=cfg.train, optim=cfg.optim, deepspeed=cfg.deepspeed,
        checkpoint=cfg.checkpoint, eval=cfg.eval, use_gpu=cfg.scaling.use_gpu, threads=threads,
        seed=cfg.run.seed, run_name=ctx.name, name=name, eval_blocks=eval_blocks,
        export_dir=cfg.output_dir or ctx.dir, tokenizer=tokenizer, metrics_dir=ctx.dir, adapter=adapter,
    )
    trainer = build_trainer(pretrain_worker, {"spec": spec}, scaling=cfg.scaling, ctx=ctx, threads=threads,
                            keep_checkpoints=cfg.checkpoint.keep, datasets={"train": train_ds})
    result = trainer.fit()
    return result, list(result.return_value or [])


def run_pretrain(cfg: PretrainConfig, ctx: RunContext) -> PretrainOutputs:
    """Run (or resume) continued pretraining; print where the model and metrics went."""
    result, history = train_lm(cfg, ctx)
    model_dir = f"{(cfg.output_dir or ctx.dir).rstrip('/')}/model"
    # Local mode (num_workers=0) returns no run folder and keeps no checkpoint.
    checkpoint = result.checkpoint.path if result.checkpoint is not None and result.path else None
    metrics = dict(result.metrics or {})
    print(f"\npretraining finished at step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}")
    print(f"model:       {model_dir}  (an HF folder: transformers' AutoModelForCausalLM loads it)")
    print(f"metrics:     {ctx.path('metrics.json')}  plot: {ctx.path('plots', 'loss.png')}")
    print(f"checkpoint:  {checkpoint or 'none (scaling.num_workers=0: local mode keeps no checkpoints)'}")
    return PretrainOutputs(run_dir=ctx.dir, model_dir=model_dir, metrics=metrics, checkpoint=checkpoint,
                           history=history)
