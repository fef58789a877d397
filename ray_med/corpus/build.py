"""Building a corpus on Ray: sources read by Ray Data read tasks, written as Parquet, counted.

:func:`run_corpus` is the corpus job (``jobs/corpus.py``, the pipeline's first stage):
read, write, train the tokenizer that pretraining then uses, and report.

This is a Ray edge over :mod:`ray_med.data`, and the corpus never passes through the
driver, which holds only metadata (paths, counts, the tokenizer):

- :func:`corpus_dataset` is the sources as one Ray Dataset: one read task per file calls
  the core reader (:func:`ray_med.data.iter_records`, the one parsing code) and yields
  Arrow batches of :data:`READ_BLOCK_RECORDS` records, so a task never holds a whole
  file. What a reader skips goes to a small :class:`SkipLog` actor, per file.
- :func:`write_parquet` streams a dataset into one Parquet file in the run folder from a
  task; :func:`train_tokenizer` streams a seeded, bounded sample of documents into one
  task that trains the BPE tokenizer.
- :func:`token_report` counts records, tokens, images and packed sequences per source
  with ``map_batches`` and a ``groupby``.

The datasets are lazy: each consumer reads the files again rather than keeping the
corpus in memory or in the object store; parsing is cheap next to what follows.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.aggregate import Count, Sum
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_med.corpus.config import CorpusJobConfig, CorpusOutputs
from ray_med.corpus.report import format_report, print_corpus
from ray_med.data import ARROW_SCHEMA, Record, check_options, iter_records, records_to_arrow, tokenize_texts
from ray_med.data.config import CorpusConfig, SourceConfig
from ray_med.data.mixture import BottomK, is_heldout, sample_key
from ray_med.data.policy import RecordErrors
from ray_med.errors import ConfigError, RayMedError
from ray_med.models import train_bpe_tokenizer
from ray_med.runtime import RunContext, Storage, init_ray, ray_get

log = logging.getLogger("ray_med.corpus")

READ_BLOCK_RECORDS = 256
"""Records per batch a read task hands on: Ray Data buffers them into blocks of at most
``DataContext.target_max_block_size``, so a task's memory is bounded whatever the file's size."""
_KEEP_REASONS = 5
# Ray Data appends its retry advice to a user error's message; the job prints the error alone.
_RAY_DATA_SUFFIX = "\nFailed to apply UDF transform"


def to_ray_dataset(records: Iterable[Record] | pa.Table | list[pa.Table]) -> ray.data.Dataset:
    """Records (or Arrow tables in the record schema) as one Ray Dataset with the same columns.

    For records already in memory (tests, small inputs); a corpus is read with
    :func:`source_dataset`, which never holds it on the driver.
    """
    if isinstance(records, pa.Table):
        return ray.data.from_arrow(records)
    if isinstance(records, list) and records and all(isinstance(t, pa.Table) for t in records):
        return ray.data.from_arrow(records)
    return ray.data.from_arrow(records_to_arrow(records))


# ------------------------------------------------------------------ errors and ordering


def _ray_med_error(exc: BaseException) -> RayMedError | None:
    """The user error behind a Ray or Ray Data failure, with Ray Data's advice trimmed off."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ray.exceptions.RayTaskError):
            cur = cur.cause
            continue
        if isinstance(cur, RayMedError):
            message = str(cur).split(_RAY_DATA_SUFFIX, 1)[0]
            return cur if message == str(cur) else type(cur)(message)
        cur = cur.__cause__ or cur.__context__
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a ray_med error from inside a Ray Data task or a Ray task as itself (one line)."""
    try:
        yield
    except Exception as exc:
        err = _ray_med_error(exc)
        if err is None:
            raise
        raise err from None


@contextlib.contextmanager
def ordered_datasets() -> Iterator[None]:
    """Datasets created inside keep their blocks in input order, and raise a map's own error.

    A dataset copies the current ``DataContext`` when it is created, so this changes
    only those datasets, not the ingest of a later Ray Train run. Order matters because
    the training data must be the same on a resumed run, and Ray Data otherwise hands on
    blocks as their tasks finish.
    """
    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.raise_original_map_exception)
    ctx.execution_options.preserve_order = True
    ctx.raise_original_map_exception = True  # the DataError itself, not a UserCodeException
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.raise_original_map_exception = before


# ------------------------------------------------------------------------------ reading


@ray.remote(num_cpus=0)
class SkipLog:
    """What the readers skipped, per (source, file); a file read again overwrites its entry."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, str], tuple[int, list[str]]] = {}

    def record(self, source: str, path: str, skipped: int, reasons: list[str]) -> None:
        self._files[(source, path)] = (skipped, list(reasons))

    def by_source(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for (source, _), (skipped, reasons) in sorted(self._files.items()):
            entry = out.setdefault(source, {"skipped": 0, "reasons": []})
            entry["skipped"] += skipped
            entry["reasons"] = (entry["reasons"] + reasons)[:_KEEP_REASONS]
        return out


def source_files(cfg: CorpusConfig, source: SourceConfig) -> list[str]:
    """The files a source reads (absolute paths, so a worker in another folder finds them)."""
    return [cfg.resolve(source)]


def _read_files(batch: dict[str, np.ndarray], sources: dict[str, SourceConfig], skip_log: Any) -> Iterator[pa.Table]:
    """The read task: every file of the batch through the core reader, a few records at a time."""
    for name, path in zip(batch["source"], batch["path"], strict=True):
        source, path = sources[str(name)], str(path)
        errors = RecordErrors(path=path, on_error=source.on_error)
        chunk: list[Record] = []
        for record in iter_records(source.reader, path, errors, source=source.name, options=source.options):
            chunk.append(record)
            if len(chunk) == READ_BLOCK_RECORDS:
                yield records_to_arrow(chunk)
                chunk = []
        if chunk:
            yield records_to_arrow(chunk)
        if skip_log is not None:
            # Waited for, so the driver's later query cannot overtake it.
            ray.get(skip_log.record.remote(source.name, path, errors.skipped, errors.reasons))


def corpus_dataset(cfg: CorpusConfig, sources: list[SourceConfig] | None = None,
                   skip_log: Any = None) -> ray.data.Dataset:
    """The sources (all by default) as one lazy Ray Dataset in :data:`ARROW_SCHEMA`, read by one task per file.

    One chain of operators whatever the number of sources or files: the driver's plan
    and bookkeeping do not grow with the corpus, only the number of blocks does. Files
    come in the config's order, and so do the blocks where the order is preserved
    (:func:`ordered_datasets`).
    """
    sources = list(cfg.sources if sources is None else sources)
    for source in sources:
        check_options(source.reader, source.options)
    items = [{"source": s.name, "path": f} for s in sources for f in source_files(cfg, s)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_files, batch_size=1, batch_format="numpy",
        fn_kwargs={"sources": {s.name: s for s in sources}, "skip_log": skip_log},
    )


def source_dataset(cfg: CorpusConfig, source: SourceConfig, skip_log: Any = None) -> ray.data.Dataset:
    """One source as a lazy Ray Dataset (:func:`corpus_dataset` of that source alone)."""
    return corpus_dataset(cfg, [source], skip_log)


def _text_only(batch: pa.Table, heldout: bool | None, fraction: float, seed: int) -> pa.Table:
    """``id, source, text`` of the documents with text; only held-out ones, only the others, or all (None)."""
    table = batch.select(["id", "source", "text"])
    table = table.filter(pc.not_equal(table["text"], ""))
    if heldout is None or not table.num_rows:
        return table
    mask = [is_heldout(rid, src, fraction, seed) == heldout
            for rid, src in zip(table["id"].to_pylist(), table["source"].to_pylist(), strict=True)]
    return table.filter(pa.array(mask, pa.bool_()))


def documents(ds: ray.data.Dataset, *, heldout: bool | None, fraction: float, seed: int) -> ray.data.Dataset:
    """The text documents of a record dataset: the held-out ones, the training ones, or all (``heldout=None``).

    Fused into the read tasks: images and the other columns never leave them.
    """
    return ds.map_batches(_text_only, batch_size=None, batch_format="pyarrow",
                          fn_kwargs={"heldout": heldout, "fraction": fraction, "seed": seed})


def union(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------- consuming in a task


def on_storage_node(storage: Storage) -> dict[str, Any]:
    """Task options that place a writer where the run folder is: this node for local storage, anywhere for a URI."""
    if not storage.is_local:
        return {}
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


# Consumers are num_cpus=0: they mostly wait on the read tasks that feed them, and a
# reserved CPU could leave those read tasks none on a small cluster (a deadlock).
@ray.remote(num_cpus=0)
def _write_parquet_task(ds: ray.data.Dataset, storage: Storage, relpath: str) -> int:
    rows = 0
    with user_errors(), storage.open_output(relpath) as out, pq.ParquetWriter(out, ARROW_SCHEMA) as writer:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.write_table(batch.select(ARROW_SCHEMA.names).cast(ARROW_SCHEMA))
            rows += batch.num_rows
    return rows


def write_parquet(datasets: dict[str, ray.data.Dataset], ctx: RunContext, folder: str) -> dict[str, str]:
    """Each dataset into ``<run>/<folder>/<name>.parquet`` (one file each, written by a task; in parallel)."""
    options = on_storage_node(ctx.storage)
    refs = {name: _write_parquet_task.options(**options).remote(ds, ctx.storage, f"{ctx.name}/{folder}/{name}.parquet")
            for name, ds in datasets.items()}
    rows = ray_get(list(refs.values()))
    for name, n in zip(refs, rows, strict=True):
        log.info("wrote %s: %d records", name, n)
    return {name: ctx.path(folder, f"{name}.parquet") for name in datasets}


@ray.remote(num_cpus=0)
def _train_tokenizer_task(docs: ray.data.Dataset, sample_documents: int, seed: int, vocab_size: int,
                          min_frequency: int) -> tuple[Any, dict[str, int]]:
    sample = BottomK(sample_documents)
    with user_errors():
        for batch in docs.iter_batches(batch_format="pyarrow", batch_size=None):
            for rid, src, text in zip(batch["id"].to_pylist(), batch["source"].to_pylist(),
                                      batch["text"].to_pylist(), strict=True):
                sample.add(sample_key(rid, src, seed), text)
    texts = sample.items()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    return tokenizer, {"documents": sample.seen, "sampled": len(texts)}


def train_tokenizer(docs: ray.data.Dataset, *, sample_documents: int, seed: int, vocab_size: int,
                    min_frequency: int) -> tuple[Any, dict[str, int]]:
    """(tokenizer, counts): BPE trained in one task on a seeded sample of ``docs`` of at most ``sample_documents``.

    The documents stream into the task, which keeps the ``sample_documents`` with the
    smallest :func:`~ray_med.data.mixture.sample_key`: the same sample whatever the
    order the read tasks finish in. The tokenizer (a vocabulary, not data) comes back.
    """
    if isinstance(sample_documents, bool) or sample_documents < 1:
        raise ConfigError(f"tokenizer.sample_documents must be >= 1, got {sample_documents}")
    tokenizer, counts = ray_get(_train_tokenizer_task.remote(docs, sample_documents, seed, vocab_size, min_frequency))
    log.info("tokenizer trained on %d of %d documents", counts["sampled"], counts["documents"])
    return tokenizer, counts


# ------------------------------------------------------------------------------ report


def _count_batch(batch: pa.Table, tokenizer: Any) -> pa.Table:
    texts = batch.column("text").to_pylist()
    has_text = [bool(t) for t in texts]
    tokens = [0] * len(texts)
    nonempty = [t for t in texts if t]
    if nonempty:
        counts = iter(len(ids) for ids in tokenize_texts(tokenizer, nonempty))
        tokens = [next(counts) if h else 0 for h in has_text]
    return pa.table(
        {
            "source": batch.column("source"),
            "tokens": pa.array(tokens, pa.int64()),
            "text_records": pa.array([int(h) for h in has_text], pa.int64()),
            "images": pc.cast(pc.is_valid(batch.column("image")), pa.int64()),
        }
    )


def token_report(ds: ray.data.Dataset, names: list[str], tokenizer: Any) -> dict[str, dict[str, int]]:
    """Records, text records, tokens (EOS included) and images per source of ``ds``, counted on the cluster.

    The tokenizer object itself is shipped to the workers (Ray puts ``fn_kwargs`` in the
    object store once), so this works on a cluster where the driver's folders are not
    visible to the workers. Only one row per source comes back.
    """
    counted = ds.map_batches(
        _count_batch, batch_format="pyarrow", batch_size=READ_BLOCK_RECORDS, fn_kwargs={"tokenizer": tokenizer}
    )
    # One partition per source is plenty; the default (200) spends seconds on empty ones.
    rows = counted.groupby("source", num_partitions=max(1, len(names))).aggregate(
        Count(alias_name="records"), Sum("tokens", alias_name="tokens"),
        Sum("text_records", alias_name="text_records"), Sum("images", alias_name="images"),
    ).take_all()
    by_source = {r["source"]: r for r in rows}
    return {name: {k: int(by_source.get(name, {}).get(k) or 0) for k in ("records", "text_records", "tokens", "images")}
            for name in names}


def run_corpus(cfg: CorpusJobConfig, ctx: RunContext) -> CorpusOutputs:
    """Read every source, train the tokenizer on the documents pretraining trains on, write and print the report."""
    cfg.corpus.check()
    resources = init_ray(cfg.run)
    log.info("Ray resources: %s", {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})
    skip_log = SkipLog.remote()
    with ordered_datasets():
        records = {s.name: source_dataset(cfg.corpus, s, skip_log) for s in cfg.corpus.sources}
        train_docs = documents(corpus_dataset(cfg.corpus, skip_log=skip_log), heldout=False,
                               fraction=cfg.heldout_fraction, seed=cfg.run.seed)
    with user_errors():
        parquet = write_parquet(records, ctx, "corpus")
        tokenizer, _ = train_tokenizer(train_docs, sample_documents=cfg.tokenizer.sample_documents, seed=cfg.run.seed,
                                       vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency)
        counts = token_report(corpus_dataset(cfg.corpus, skip_log=skip_log), [s.name for s in cfg.corpus.sources],
                              tokenizer)
    skips = ray_get(skip_log.by_source.remote())
    with ctx.local_dir("tokenizer") as tok_dir:
        tokenizer.save_pretrained(str(tok_dir))
    per_source: dict[str, dict[str, Any]] = {}
    for source in cfg.corpus.sources:
        c, s = counts[source.name], skips.get(source.name, {"skipped": 0, "reasons": []})
        per_source[source.name] = {
            "reader": source.reader,
            "path": ", ".join(source_files(cfg.corpus, source)),
            "records": c["records"],
            "skipped": s["skipped"],
            "skip_reasons": s["reasons"],
            "text_records": c["text_records"],
            "tokens": c["tokens"],
            "images": c["images"],
            "sequences": c["tokens"] // cfg.seq_len,
            "weight": source.weight if source.weight is not None else "natural",
            "parquet": parquet[source.name],
        }
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

