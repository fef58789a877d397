"""Every reader's records become one Ray Dataset with one schema (shared local Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_med.data import ARROW_SCHEMA, read_records

FIXTURES = Path(__file__).resolve().parent / "fixtures"

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
