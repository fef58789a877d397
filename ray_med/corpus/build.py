"""Building a corpus on Ray: sources read in parallel, written as Parquet, counted with Ray Data.

:func:`run_corpus` is the corpus job (``jobs/corpus.py``, the pipeline's first stage):
read, write, train the tokenizer that pretraining then uses, and report.

This is a Ray edge over :mod:`ray_med.data`. Each source is read by a Ray task with
the core readers, the records come back as Arrow tables in the uniform schema, and
are written to ``<run>/corpus/<source>.parquet`` so later stages read them without
parsing the original formats again. :func:`token_report` turns the tables into one
Ray Dataset and counts records, tokens, images and packed sequences per source with
``map_batches`` and a ``groupby``, so the same code scales from the demo's three files
to a cluster-sized corpus.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.aggregate import Count, Sum

from ray_med.corpus.config import CorpusJobConfig, CorpusOutputs
from ray_med.corpus.report import format_report, print_corpus
from ray_med.data import Record, read_records, records_to_arrow, tokenize_texts
from ray_med.data.config import CorpusConfig, SourceConfig
from ray_med.data.mixture import is_heldout
from ray_med.models import train_bpe_tokenizer
from ray_med.runtime import RunContext, init_ray, ray_get

log = logging.getLogger("ray_med.corpus")


@dataclass
class SourceData:
    """One source after reading: its records as Arrow, and what was skipped."""

    source: SourceConfig
    path: str
    table: pa.Table
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    parquet: str | None = None


def to_ray_dataset(records: Iterable[Record] | pa.Table | list[pa.Table]) -> ray.data.Dataset:
    """Records (or Arrow tables in the record schema) as one Ray Dataset with the same columns."""
    if isinstance(records, pa.Table):
        return ray.data.from_arrow(records)
    if isinstance(records, list) and records and all(isinstance(t, pa.Table) for t in records):
        return ray.data.from_arrow(records)
    return ray.data.from_arrow(records_to_arrow(records))


@ray.remote(num_cpus=1)
def _read_source(source: SourceConfig, path: str) -> tuple[pa.Table, int, list[str]]:
    result = read_records(source.reader, path, source=source.name, on_error=source.on_error, options=source.options)
    return records_to_arrow(result.records), result.skipped, result.reasons


def read_corpus(cfg: CorpusConfig, ctx: RunContext | None = None) -> dict[str, SourceData]:
    """Read every source as a Ray task; write each to Parquet in the run folder if given."""
    cfg.check()
    paths = {s.name: cfg.resolve(s) for s in cfg.sources}
    pending = {_read_source.remote(s, paths[s.name]): s for s in cfg.sources}
    out: dict[str, SourceData] = {}
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        source = pending.pop(ref)
        table, skipped, reasons = ray_get(ref)
        data = SourceData(source=source, path=paths[source.name], table=table, skipped=skipped, reasons=reasons)
        if ctx is not None:
            data.parquet = _write_parquet(ctx, f"corpus/{source.name}.parquet", table)
        out[source.name] = data
        log.info("read %s: %d records%s", source.name, table.num_rows, f", {skipped} skipped" if skipped else "")
    # Keep the config's order, not the completion order.
    return {s.name: out[s.name] for s in cfg.sources}


def _write_parquet(ctx: RunContext, relpath: str, table: pa.Table) -> str:
    target = ctx.path(relpath)
    if ctx.storage.is_local:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target)
    else:
        fs, base = ctx.storage.filesystem()
        path = f"{base}/{ctx.name}/{relpath}"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)
    return target


def _count_batch(batch: pa.Table, tokenizer: Any) -> pa.Table:
    texts = batch.column("text").to_pylist()
    has_text = [bool(t) for t in texts]
    tokens = [0] * len(texts)
    nonempty = [t for t in texts if t]
    if nonempty:
        counts = iter(len(ids) for ids in tokenize_texts(tokenizer, nonempty))
        tokens = [next(counts) if h else 0 for h in has_text]
    images = pc.cast(batch.column("image"), pa.int64())
    return pa.table(
        {
            "source": batch.column("source"),
            "tokens": pa.array(tokens, pa.int64()),
            "text_records": pa.array([int(h) for h in has_text], pa.int64()),
            "images": images,
        }
    )


def token_report(sources: dict[str, SourceData], tokenizer: Any, seq_len: int) -> dict[str, dict[str, Any]]:
    """Records, tokens (EOS included), images and full ``seq_len`` sequences per source.

    The tokenizer object itself is shipped to the workers (Ray puts ``fn_kwargs`` in the
    object store once), so this works on a cluster where the driver's folders are not
    visible to the workers.
    """
    # Only what counting needs travels to the workers: image bytes become a flag.
    ds = to_ray_dataset(
        [
            pa.table({"source": d.table["source"], "text": d.table["text"], "image": pc.is_valid(d.table["image"])})
            for d in sources.values()
        ]
    )
    counted = ds.map_batches(
        _count_batch, batch_format="pyarrow", batch_size=256, fn_kwargs={"tokenizer": tokenizer}
    )
    # One partition per source is plenty; the default (200) spends seconds on empty ones.
    rows = counted.groupby("source", num_partitions=max(1, len(sources))).aggregate(
        Count(alias_name="records"), Sum("tokens", alias_name="tokens"),
        Sum("text_records", alias_name="text_records"), Sum("images", alias_name="images"),
    ).take_all()
    by_source = {r["source"]: r for r in rows}
    report: dict[str, dict[str, Any]] = {}
    for name, data in sources.items():
        row = by_source.get(name, {})
        tokens = int(row.get("tokens") or 0)
        report[name] = {
            "reader": data.source.reader,
            "path": data.path,
            "records": int(row.get("records") or 0),
            "skipped": data.skipped,
            "skip_reasons": data.reasons,
            "text_records": int(row.get("text_records") or 0),
            "tokens": tokens,
            "images": int(row.get("images") or 0),
            "sequences": tokens // seq_len,
            "weight": data.source.weight if data.source.weight is not None else "natural",
            "parquet": data.parquet,
        }
    return report


def run_corpus(cfg: CorpusJobConfig, ctx: RunContext) -> CorpusOutputs:
    """Read every source, train the tokenizer on the documents pretraining trains on, write and print the report."""
    cfg.corpus.check()
    resources = init_ray(cfg.run)
    log.info("Ray resources: %s", {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})
    sources = read_corpus(cfg.corpus, ctx)
    texts = (
        text
        for name, d in sources.items()
        for rid, text in zip(d.table.column("id").to_pylist(), d.table.column("text").to_pylist(), strict=True)
        if text and not is_heldout(rid, name, cfg.heldout_fraction, cfg.run.seed)
    )
    with ctx.local_dir("tokenizer") as tok_dir:
        tokenizer = train_bpe_tokenizer(
            texts, vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency, out_dir=tok_dir
        )
    per_source = token_report(sources, tokenizer, cfg.seq_len)
    tokenizer_dir = ctx.path("tokenizer")
    report = {
        "run": ctx.name,
        "seq_len": cfg.seq_len,
        "tokenizer": {"path": tokenizer_dir, "vocab_size": len(tokenizer)},
        "sources": per_source,
        "total": {
            k: sum(s[k] for s in per_source.values())
            for k in ("records", "skipped", "text_records", "tokens", "images", "sequences")
        },
    }
    report_path = ctx.write_text("data_report.json", json.dumps(report, indent=2) + "\n")
    ctx.write_text("data_report.md", format_report(report) + "\n")
    outputs = CorpusOutputs(run_dir=ctx.dir, corpus_dir=ctx.path("corpus"), tokenizer_dir=tokenizer_dir,
                            report_path=report_path, report=report)
    print_corpus(outputs)
    return outputs
