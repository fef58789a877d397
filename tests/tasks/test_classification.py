"""Classification tasks: label spaces, pairs, stratified train/dev/test splits, class weights, the outcome CSV."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ray_med.config import from_dict
from ray_med.data import read_records
from ray_med.errors import ConfigError, DataError
from ray_med.tasks import TaskData, class_weights, get_task, stratified_split, task_data
from ray_med.tasks.classification import train_dev_test_split
from ray_med.training.config import FinetuneConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_pubmedqa_settings_differ_in_their_second_text(shared_data: Path) -> None:
    records = read_records("pubmedqa", str(shared_data / "pubmedqa/pqal_trainval.json")).records
    rr = task_data(get_task("pubmedqa"), records)
    rf = task_data(get_task("pubmedqa_rf"), records)
    assert rr.labels == rf.labels == ["yes", "no", "maybe"]
    assert len(rr.texts) == len(rf.texts) == 500
    assert rr.texts == rf.texts  # the question
    assert rr.pairs[0] == records[0].context and rf.pairs[0] == records[0].meta["long_answer"]
    assert Counter(rr.y.tolist()) == {0: 276, 1: 169, 2: 55}


def test_stratified_split_keeps_proportions() -> None:
    y = np.array([0] * 276 + [1] * 169 + [2] * 55)
    train, dev = stratified_split(y, 50, seed=0)
    assert len(train) == 450 and len(dev) == 50 and not set(train) & set(dev)
    # 50 x (276, 169, 55) / 500 = 27.6, 16.9, 5.5 -> 28, 17, 5 by largest remainder.
    assert np.bincount(y[dev]).tolist() == [28, 17, 5]
    assert np.array_equal(stratified_split(y, 50, seed=0)[1], dev)


def test_train_dev_test_split_is_disjoint_stratified_and_seeded() -> None:
    y = np.array([0] * 276 + [1] * 169 + [2] * 55)
    s = train_dev_test_split(y, 50, 0.2, seed=0)  # a count and a fraction (of all 500)
    assert (len(s.train), len(s.dev), len(s.test)) == (350, 50, 100)
    assert sorted(np.concatenate([s.train, s.dev, s.test]).tolist()) == list(range(500))  # disjoint, complete
    # 100 x (276, 169, 55) / 500 = 55.2, 33.8, 11 -> 55, 34, 11; dev from the 400 left keeps them too.
    assert np.bincount(y[s.test]).tolist() == [55, 34, 11]
    assert np.bincount(y[s.dev]).tolist() == [28, 17, 5]
    again = train_dev_test_split(y, 50, 0.2, seed=0)
    assert all(np.array_equal(getattr(s, k), getattr(again, k)) for k in ("train", "dev", "test"))
    other = train_dev_test_split(y, 50, 0.2, seed=1)
    assert not np.array_equal(s.test, other.test)
    ids = [f"r{i}" for i in range(500)]
    data = TaskData(ids=ids, texts=ids, pairs=None, y=y, labels=["a", "b", "c"])
    assert s.ids(data)["test"] == [ids[i] for i in s.test] and set(s.ids(data)) == {"train", "dev", "test"}


@pytest.mark.parametrize("dev,test,message", [
    (2, 0.01, r"data.test_size=0.01 selects no example of 40: the test split would be empty"),
    (0.01, 5, r"data.dev_size=0.01 selects no example of 40: the dev split would be empty"),
    (20, 20, r"leave no training example of 40"),
])
def test_empty_split_is_one_clear_config_error(dev, test, message) -> None:
    with pytest.raises(ConfigError, match=message):
        train_dev_test_split(np.array([0, 1] * 20), dev, test)


@pytest.mark.parametrize("data,message", [
    ({"test_size": 0}, "data.test_size must be a count >= 1 or a fraction in (0, 1), got 0"),
    ({"dev_size": 1.0}, "data.dev_size must be a count >= 1 or a fraction in (0, 1), got 1.0"),
    ({"dev_size": 0.5, "test_size": 0.5}, "leave no training data"),
])
def test_split_sizes_are_checked_when_the_config_loads(data, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(FinetuneConfig, {"data": data})
    cfg = from_dict(FinetuneConfig, {"data": {"dev_size": 50, "test_size": 0.2}})
    assert isinstance(cfg.data.dev_size, int) and isinstance(cfg.data.test_size, float)


def test_class_weights_are_n_over_k_nk() -> None:
    y = np.array([0, 0, 0, 1])
    # N=4, K=2: 4/(2*3) and 4/(2*1)
    assert class_weights(y, 2) == pytest.approx([2 / 3, 2.0])
    assert class_weights(y, 3)[2] == 0.0


def test_mtsamples_specialties_with_enough_notes(shared_data: Path) -> None:
    records = read_records("mtsamples", str(shared_data / "mtsamples/mtsamples_400.csv"), on_error="skip").records
    data = task_data(get_task("mtsamples_specialty"), records)
    assert data.labels == ["Bariatrics", "Surgery", "Urology"]  # the classes with >= 10 notes
    assert len(data.texts) == 10 + 221 + 156


def test_mimic_outcome_fixtures() -> None:
    mor = task_data(get_task("mimic_mor"), read_records("mimic_outcomes", str(FIXTURES / "mimic_outcomes_mor.csv")).records)
    assert mor.y.tolist() == [1, 0, 1, 0, 0, 1] and mor.labels == ["0", "1"]
    diag = task_data(get_task("mimic_diag"),
                     read_records("mimic_outcomes", str(FIXTURES / "mimic_outcomes_diag.csv")).records)
    assert diag.labels == ["038.9", "401.9", "410.71", "428.0", "486", "584.9", "599.0"]
    assert diag.y.shape == (4, 7) and diag.y[:, 0].tolist() == [1, 0, 0, 1]
    assert get_task("mimic_los").ordinal


def test_mimic_outcomes_malformed(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text('id,text,label\n1,"note one",1\n2,"note two",\n3,"note three",0\n')
    with pytest.raises(DataError, match=r"o.csv: malformed record at data row 2 \(id 2\): empty label"):
        read_records("mimic_outcomes", str(path))
    res = read_records("mimic_outcomes", str(path), on_error="skip")
    assert [r.id for r in res.records] == ["1", "3"] and res.skipped == 1
    bad = tmp_path / "b.csv"
    bad.write_text("id,text\n1,x\n")
    with pytest.raises(DataError, match="needs a .label. or .labels. column"):
        read_records("mimic_outcomes", str(bad))


def test_unknown_task() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'pubmedqa_rf'"):
        get_task("pubmedqa-rf")
