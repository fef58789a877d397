"""Streaming reads and the seeded, bounded tokenizer sample (pure functions, no Ray)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from ray_med.data import iter_records, read_records
from ray_med.data.mixture import BottomK, is_heldout, sample_key
from ray_med.data.policy import RecordErrors
from ray_med.errors import ConfigError, DataError


def test_iter_records_streams_the_same_records_as_read_records(shared_data: Path) -> None:
    path = str(shared_data / "mtsamples/mtsamples_400.csv")
    errors = RecordErrors(path=path, on_error="skip")
    streamed = list(iter_records("mtsamples", path, errors, source="clinical"))
    whole = read_records("mtsamples", path, source="clinical", on_error="skip")
    assert streamed == whole.records and len(streamed) == 397
    assert errors.skipped == whole.skipped == 4 and errors.reasons == whole.reasons


def test_iter_records_is_lazy(tmp_path: Path) -> None:
    # The malformed last line is reached only when the stream gets there: nothing is read ahead.
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 1, "text": "first"}\n{"id": 2, "text": "second"}\n{"id": 3}\n')
    stream = iter_records("jsonl", str(path), RecordErrors(path=str(path)))
    assert [next(stream).text, next(stream).text] == ["first", "second"]
    with pytest.raises(DataError, match=r"c.jsonl: malformed record at line 3"):
        next(stream)


def test_iter_records_checks_reader_and_options_before_reading(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no option"):
        iter_records("jsonl", str(tmp_path / "missing.jsonl"), RecordErrors(path="x"), options={"txt_field": "a"})
    with pytest.raises(DataError, match="file not found"):
        iter_records("jsonl", str(tmp_path / "missing.jsonl"), RecordErrors(path="x"))


def test_bottom_k_is_a_bounded_sample_independent_of_order() -> None:
    ids = [f"doc{i}" for i in range(500)]
    samples = []
    for order_seed in range(3):
        shuffled = ids[:]
        random.Random(order_seed).shuffle(shuffled)
        sample = BottomK(50)
        for rid in shuffled:
            sample.add(sample_key(rid, "abstracts", seed=7), rid)
        assert sample.seen == 500
        samples.append(sample.items())
    assert samples[0] == samples[1] == samples[2] and len(samples[0]) == 50 and len(set(samples[0])) == 50
    # the smallest keys, smallest first
    assert samples[0] == sorted(ids, key=lambda r: sample_key(r, "abstracts", seed=7))[:50]
    # the seed and the source change the sample
    other = BottomK(50)
    for rid in ids:
        other.add(sample_key(rid, "abstracts", seed=8), rid)
    assert set(other.items()) != set(samples[0])


def test_bottom_k_keeps_everything_below_k_and_rejects_k_below_one() -> None:
    sample = BottomK(10)
    for i in range(4):
        sample.add(sample_key(str(i), "s"), str(i))
    assert sorted(sample.items()) == ["0", "1", "2", "3"]
    with pytest.raises(ConfigError):
        BottomK(0)


def test_sample_key_is_not_the_heldout_hash() -> None:
    # With the held-out hash as the key, the sample would be the training documents
    # closest to the held-out cut (scores just above 0.5); it must spread over all of them.
    def heldout_score(rid: str) -> float:
        return int.from_bytes(hashlib.sha256(f"0:s:{rid}".encode()).digest()[:8], "big") / 2**64

    ids = [str(i) for i in range(4000)]
    train = [r for r in ids if not is_heldout(r, "s", 0.5, seed=0)]
    assert all(heldout_score(r) >= 0.5 for r in train)  # the score is is_heldout's
    sample = sorted(train, key=lambda r: sample_key(r, "s", seed=0))[:100]
    assert 0.7 < sum(heldout_score(r) for r in sample) / len(sample) < 0.8
