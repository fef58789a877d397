"""``evaluate.py classify`` scores the run's test split by default, never the training items (tiny model, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ray_med.adapters.classifier import save_classifier
from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.stacking import ClassifierSpec, build_classifier
from ray_med.config import from_dict
from ray_med.data import read_records
from ray_med.errors import ConfigError, DataError, ModelError
from ray_med.evaluation.classify_eval import classify_task, locate
from ray_med.evaluation.config import ClassifyEvalConfig
from ray_med.models import build_model, load_base_model, save_pretrained, train_bpe_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = FIXTURES / "mimic_outcomes_mor.csv"  # ids 100001-100006, labels 1 0 1 0 0 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A downstream run's output folder as finetune writes it: adapter/ and splits.json side by side."""
    tmp = tmp_path_factory.mktemp("classify_eval")
    records = read_records("mimic_outcomes", str(DATA)).records
    tok = train_bpe_tokenizer([r.text for r in records] * 5, vocab_size=300)
    base = save_pretrained(build_model("tiny-llama", vocab_size=len(tok)), tmp / "base", tokenizer=tok)
    torch.manual_seed(0)
    spec = ClassifierSpec(num_labels=2, task_type="binary", pooling="last", labels=["0", "1"],
                          downstream=AdapterConfig(r=4, alpha=8))
    run = tmp / "run"
    save_classifier(build_classifier(load_base_model(str(base)), spec), spec, run / "adapter", str(base))
    (run / "splits.json").write_text(json.dumps({
        "task": "mimic_mor", "data": str(DATA), "reader": "mimic_outcomes", "seed": 0,
        "train": ["100001", "100002"], "dev": ["100003", "100004"], "test": ["100005", "100006"],
    }))
    return run


def _score(capsys, **keys) -> dict:
    out = classify_task(from_dict(ClassifyEvalConfig, {"bootstrap": 10, "max_length": 32, **keys}))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(out.metrics))
    return out.metrics


def test_run_folder_scores_its_test_split_by_default(run_dir, capsys) -> None:
    # The run folder alone: task, data and the test ids all come from splits.json.
    m = _score(capsys, model=str(run_dir))
    assert m["split"] == "test" and m["n"] == 2 and m["task"] == "mimic_mor" and m["data"] == str(DATA)
    assert m["adapter"] == str(run_dir / "adapter") and m["splits"] == str(run_dir / "splits.json")
    # The classifier folder finds the same splits.json beside it.
    assert _score(capsys, model=str(run_dir / "adapter"))["accuracy"] == m["accuracy"]
    assert _score(capsys, model=str(run_dir), split="dev")["n"] == 2
    everything = _score(capsys, model=str(run_dir), split="all")
    assert everything["split"] == "all" and everything["n"] == 6  # training items included


def test_ids_file_still_picks_the_records(run_dir, tmp_path, capsys) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("100001\n100003\n100006\n")
    m = _score(capsys, model=str(run_dir), ids_file=str(ids))
    assert m["split"] == "ids_file" and m["n"] == 3


def test_locate(run_dir, tmp_path) -> None:
    assert locate(str(run_dir)) == (str(run_dir / "adapter"), run_dir / "splits.json")
    assert locate(str(run_dir / "adapter")) == (str(run_dir / "adapter"), run_dir / "splits.json")
    assert locate(str(tmp_path)) == (str(tmp_path), None)


def test_errors_are_one_clear_line(run_dir, tmp_path, capsys) -> None:
    bare = tmp_path / "bare"  # a classifier without splits.json beside it: no default split
    bare.mkdir()
    for f in (run_dir / "adapter").iterdir():
        if f.is_file():
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match=r"no splits.json beside the classifier, so its test split is unknown; "
                                          r"pass split=all"):
        classify_task(from_dict(ClassifyEvalConfig, {"model": str(bare), "task": "mimic_mor", "data": str(DATA)}))
    assert _score(capsys, model=str(bare), task="mimic_mor", data=str(DATA), split="all")["n"] == 6
    with pytest.raises(ConfigError, match="set task="):
        classify_task(from_dict(ClassifyEvalConfig, {"model": str(bare)}))
    ids = tmp_path / "ids.txt"
    ids.write_text("100001\n")
    with pytest.raises(ConfigError, match="give split or ids_file, not both"):
        classify_task(from_dict(ClassifyEvalConfig, {"model": str(run_dir), "split": "test", "ids_file": str(ids)}))
    # Another file than the one trained on: its ids are not the split's.
    other = tmp_path / "other.csv"
    other.write_text('id,text,label\n9,"a note",1\n100005,"another note",0\n')
    with pytest.raises(DataError, match=r"1 of the 2 ids of the test split of .*splits.json are not in it"):
        classify_task(from_dict(ClassifyEvalConfig, {"model": str(run_dir), "data": str(other)}))
    with pytest.raises(ModelError, match="not a folder"):
        classify_task(from_dict(ClassifyEvalConfig, {"model": str(tmp_path / "missing")}))
    with pytest.raises(ConfigError, match="must be one of 'test', 'dev', 'train', 'all'"):
        from_dict(ClassifyEvalConfig, {"model": str(run_dir), "split": "validation"})
