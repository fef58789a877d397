"""Scoring a saved classifier: the ``evaluate.py classify`` task.

A downstream fine-tuning run writes ``splits.json`` (the task, the data file and the ids
of its train/dev/test splits) beside its classifier folder. Given a run folder or a
classifier folder with one beside it, this scores the **test split** by default, the
items no epoch was trained or selected on; ``split=dev|train`` picks another split and
``split=all`` every labelled record of the file (training items included, so optimistic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_med.adapters.classifier import HEAD_CONFIG, load_classifier
from ray_med.data import read_records
from ray_med.errors import ConfigError, DataError, ModelError
from ray_med.evaluation.classify import encode, predict
from ray_med.evaluation.config import ClassifyEvalConfig, EvalOutputs
from ray_med.evaluation.metrics import classification_metrics
from ray_med.models import load_tokenizer
from ray_med.tasks import get_task, task_data

SPLITS_FILE = "splits.json"
"""Written by the downstream stage beside its classifier folder."""


def locate(model: str) -> tuple[str, Path | None]:
    """(the classifier folder, the splits.json beside it or None) of a run/output folder or a classifier folder."""
    path = Path(model)
    if not (path / HEAD_CONFIG).is_file() and (path / "adapter" / HEAD_CONFIG).is_file():
        return str(path / "adapter"), (path / SPLITS_FILE) if (path / SPLITS_FILE).is_file() else None
    beside = path.parent / SPLITS_FILE
    return model, beside if beside.is_file() else None


def _read_splits(path: Path) -> dict[str, Any]:
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable splits file ({exc})") from None
    if not all(isinstance(splits.get(k), list) for k in ("train", "dev", "test")):
        raise DataError(f"{path}: a splits file lists train, dev and test ids")
    return splits


def _wanted_ids(cfg: ClassifyEvalConfig, splits_path: Path | None, splits: dict[str, Any]) -> tuple[str, list | None]:
    """(what is scored, the ids to keep or None for every record)."""
    if cfg.ids_file:
        if cfg.split is not None:
            raise ConfigError(f"give split or ids_file, not both (split={cfg.split}, ids_file={cfg.ids_file})")
        if not Path(cfg.ids_file).is_file():
            raise DataError(f"ids file not found: {cfg.ids_file}")
        return "ids_file", Path(cfg.ids_file).read_text().split()
    split = cfg.split or "test"
    if split == "all":
        return "all", None
    if splits_path is None:
        raise ConfigError(f"{cfg.model}: no {SPLITS_FILE} beside the classifier, so its {split} split is unknown; "
                          f"pass split=all to score every record of data (training items included) or ids_file=")
    return split, splits[split]


def classify_task(cfg: ClassifyEvalConfig) -> EvalOutputs:
    """Metrics of the classifier in ``cfg.model`` on its test split (or ``cfg.split``, or ``cfg.ids_file``'s ids)."""
    if "://" in cfg.model:
        raise ConfigError(f"{cfg.model}: evaluate.py classify reads a local (or shared-filesystem) folder; "
                          "copy the run folder here first")
    if not Path(cfg.model).is_dir():
        raise ModelError(f"{cfg.model}: not a folder (give a downstream run folder or its classifier folder)")
    classifier, splits_path = locate(cfg.model)
    splits = _read_splits(splits_path) if splits_path is not None else {}
    task_name = cfg.task or splits.get("task")
    if not task_name:
        raise ConfigError(f"{cfg.model}: no {SPLITS_FILE} beside the classifier to take the task from; set task=")
    task = get_task(task_name)
    data = cfg.data or splits.get("data")
    if not data:
        raise ConfigError(f"{cfg.model}: no {SPLITS_FILE} beside the classifier to take the data file from; set data=")
    reader = cfg.format or (splits.get("reader") if not cfg.data else None) or task.reader
    scored, ids = _wanted_ids(cfg, splits_path, splits)
    model, meta = load_classifier(classifier, base_path=cfg.base)
    records = read_records(reader, data, on_error="skip").records
    if ids is not None:
        wanted = set(ids)
        records = [r for r in records if r.id in wanted]
        missing = len(wanted - {r.id for r in records})
        if missing:
            source = cfg.ids_file if scored == "ids_file" else f"the {scored} split of {splits_path}"
            raise DataError(f"{data}: {missing} of the {len(wanted)} ids of {source} are not in it; score the file "
                            f"the classifier was trained on, or pass split=all")
    examples = task_data(task, records, labels=meta["labels"] or None)
    if not len(examples.y):
        raise DataError(f"{data}: no labelled {task.name} examples to score")
    tokenizer = load_tokenizer(cfg.base or meta["base_model"])
    scores = predict(model, encode(tokenizer, examples, cfg.max_length), task.task_type)
    metrics = classification_metrics(examples.y, scores, task.task_type, ordinal=task.ordinal,
                                     n_bootstrap=cfg.bootstrap)
    out = EvalOutputs({
        "task": task.name, "adapter": classifier, "data": data, "split": scored,
        "splits": str(splits_path) if splits_path else None, "n": len(examples.y),
        "labels": examples.labels, "auroc_ci": metrics["auroc_macro_ci"], **metrics,
    })
    print(json.dumps(out.metrics))
    return out
