"""Every reader's records become one Ray Dataset with one schema (shared local Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_med.data import ARROW_SCHEMA, read_records

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

pytestmark = pytest.mark.ray


def test_records_from_every_format_make_one_dataset(ray_session, shared_data: Path) -> None:
    from ray_med.corpus.build import to_ray_dataset

    records = []
    for reader, path, options in [
        ("medqa", FIXTURES / "medqa.jsonl", None),
        ("medmcqa", FIXTURES / "medmcqa.jsonl", None),
        ("mimic_notes", FIXTURES / "mimic_iv_notes.csv", None),
        ("jsonl", FIXTURES / "corpus.jsonl", None),
        ("text", FIXTURES / "corpus.txt", {"split": "paragraph"}),
        ("medmnist", shared_data / "pneumoniamnist/pneumoniamnist_trainval.npz", {"splits": ["val"]}),
    ]:
        records += read_records(reader, str(path), options=options).records
    ds = to_ray_dataset(records)
    assert ds.schema().names == ARROW_SCHEMA.names
    assert ds.count() == len(records) == 4 + 4 + 3 + 3 + 3 + 270
    per_source = {r["source"]: r["count()"] for r in ds.groupby("source").count().take_all()}
    assert per_source["medmnist"] == 270 and per_source["mimic_notes"] == 3
    with_images = sum(row["image"] is not None for row in ds.select_columns(["image"]).iter_rows())
    assert with_images == 270


# ------------------------------------------------- the corpus stays on the cluster


def _pretrain_cfg(shared: Path, storage: Path, *extra: str):
    from ray_med.config import load_config
    from ray_med.training.config import PretrainConfig

    return load_config(PretrainConfig, REPO / "jobs/configs/pretrain/tiny.yaml", [
        f"corpus.root={shared}", f"run.storage={storage}", "run.name=prep", "train.seq_len=64",
        "tokenizer.vocab_size=512", "eval.max_sequences=8", *extra,
    ])


def _holds_corpus(obj, depth: int = 0) -> bool:
    """Whether a value the driver received holds documents: Arrow data with a ``text`` column, or records."""
    import pyarrow as pa

    from ray_med.data import Record

    if depth > 4:
        return False
    if isinstance(obj, pa.Table | pa.RecordBatch):
        return "text" in obj.schema.names
    if isinstance(obj, Record):
        return True
    if isinstance(obj, dict):
        return "text" in obj or any(_holds_corpus(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_holds_corpus(v, depth + 1) for v in obj[:1000])
    return False


def test_prepare_data_keeps_the_corpus_off_the_driver(ray_session, shared_data, tmp_path, monkeypatch) -> None:
    """Every object the driver fetches from the cluster is checked: none holds documents.

    Only ``ray.get`` in this process is wrapped; the read, tokenizer and held-out tasks
    run in Ray's worker processes. The old driver fetched each source's Arrow table.
    """
    import json

    import ray
    import ray.data

    from ray_med.data.mixture import is_heldout
    from ray_med.runtime import start_run
    from ray_med.training.pretrain import prepare_data

    received = []
    real_get = ray.get

    def spying_get(*args, **kwargs):
        out = real_get(*args, **kwargs)
        received.append(out)
        return out

    monkeypatch.setattr(ray, "get", spying_get)
    cfg = _pretrain_cfg(shared_data, tmp_path)
    ctx = start_run("pretrain", cfg, cfg.run)
    train, eval_blocks, tokenizer, stats = prepare_data(cfg, ctx)

    # The spy works: the tokenizer trained in a task came through it.
    assert any(isinstance(o, tuple) and o and o[0] is tokenizer for o in received)
    assert not any(_holds_corpus(obj) for obj in received), "documents were fetched to the driver"
    assert isinstance(train, ray.data.Dataset) and train.columns() == ["input_ids"]
    assert train.count() == sum(s["mixture_sequences"] for s in stats.values()) > 1000
    assert set(eval_blocks) == {"abstracts", "clinical", "replay"}
    assert all(b.shape[1] == 64 and 0 < len(b) <= 8 for b in eval_blocks.values())
    assert len(tokenizer) == 512

    # The held-out documents went to files, by the stable per-document hash, and nowhere else.
    for name, st in stats.items():
        lines = [json.loads(line) for line in (tmp_path / "prep" / "heldout" / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == st["heldout_documents"] > 0
        assert all(is_heldout(r["id"], name, cfg.eval.heldout_fraction, cfg.run.seed) and r["text"] for r in lines)
    assert (tmp_path / "prep" / "tokenizer" / "tokenizer.json").is_file()


def test_tokenizer_trains_on_a_bounded_sample_of_the_training_split(ray_session) -> None:
    import ray.data

    from ray_med.corpus.build import documents, train_tokenizer, user_errors
    from ray_med.data import Record, records_to_arrow
    from ray_med.data.mixture import is_heldout

    records = [Record(id=str(i), source="s", text=f"common words here number {i % 7}") for i in range(60)]
    held = [r for r in records if is_heldout(r.id, "s", 0.2)]
    assert held
    for r in held:  # a word only the held-out documents have, frequent enough to become a token
        r.text += " zyqxwvzyqxwv" * 20
    ds = ray.data.from_arrow(records_to_arrow(records))
    with user_errors():
        tok, counts = train_tokenizer(documents(ds, heldout=False, fraction=0.2, seed=0), sample_documents=25,
                                      seed=0, vocab_size=300, min_frequency=2)
    assert counts == {"documents": 60 - len(held), "sampled": 25}
    assert len(tok.tokenize(" zyqxwvzyqxwv")) > 2  # never learned: held-out text did not shape the vocabulary
    with user_errors():
        tok_all, _ = train_tokenizer(documents(ds, heldout=None, fraction=0.2, seed=0), sample_documents=100,
                                     seed=0, vocab_size=300, min_frequency=2)
    assert len(tok_all.tokenize(" zyqxwvzyqxwv")) <= 2  # ...which it would have with them


def test_read_tasks_report_skips_and_raise_one_line_errors(ray_session, shared_data) -> None:
    import ray

    from ray_med.corpus.build import SkipLog, source_dataset, user_errors
    from ray_med.data.config import CorpusConfig, SourceConfig
    from ray_med.errors import DataError

    source = SourceConfig(name="clinical", reader="mtsamples", path="mtsamples/mtsamples_400.csv", on_error="skip")
    cfg = CorpusConfig(root=str(shared_data), sources=[source])
    skips = SkipLog.remote()
    ds = source_dataset(cfg, source, skips).materialize()
    assert ds.count() == 397
    by_source = ray.get(skips.by_source.remote())
    assert by_source["clinical"]["skipped"] == 4
    assert by_source["clinical"]["reasons"][0] == "data row 98 (id 97): empty transcription"

    strict = SourceConfig(name="clinical", reader="mtsamples", path="mtsamples/mtsamples_400.csv")
    with pytest.raises(DataError) as err, user_errors():
        source_dataset(CorpusConfig(root=str(shared_data), sources=[strict]), strict).count()
    message = str(err.value)
    assert "\n" not in message and "mtsamples_400.csv: malformed record at data row 98" in message


def test_shuffle_blocks_keep_every_piece_above_rays_inline_limit() -> None:
    from ray_med.training.pretrain import _SHUFFLE_PIECE_BYTES, _shuffle_blocks

    for size, blocks in [(19 * 2**20, 30), (2 * 2**20, 5), (160 * 2**30, 2000), (10, 4)]:
        n = _shuffle_blocks(size, blocks)
        assert 1 <= n <= blocks
        assert n == 1 or size / n**2 >= _SHUFFLE_PIECE_BYTES  # a piece of the n x n is large
    assert _shuffle_blocks(160 * 2**30, 2000) > 500  # a large corpus still shuffles in parallel
