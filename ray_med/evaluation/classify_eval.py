"""Scoring a saved classifier on any labelled file: the ``evaluate.py classify`` task."""

from __future__ import annotations

import json
from pathlib import Path

from ray_med.adapters.classifier import load_classifier
from ray_med.data import read_records
from ray_med.errors import DataError
from ray_med.evaluation.classify import encode, predict
from ray_med.evaluation.config import ClassifyEvalConfig, EvalOutputs
from ray_med.evaluation.metrics import classification_metrics
from ray_med.models import load_tokenizer
from ray_med.tasks import get_task, task_data


def classify_task(cfg: ClassifyEvalConfig) -> EvalOutputs:
    """Metrics of the classifier in ``cfg.model`` on ``cfg.data`` (only the ids in ``cfg.ids_file`` when given)."""
    task = get_task(cfg.task)
    ids = None
    if cfg.ids_file:
        if not Path(cfg.ids_file).is_file():
            raise DataError(f"ids file not found: {cfg.ids_file}")
        ids = set(Path(cfg.ids_file).read_text().split())
    model, meta = load_classifier(cfg.model, base_path=cfg.base)
    records = read_records(cfg.format or task.reader, cfg.data, on_error="skip").records
    if ids is not None:
        records = [r for r in records if r.id in ids]
    examples = task_data(task, records, labels=meta["labels"] or None)
    tokenizer = load_tokenizer(cfg.base or meta["base_model"])
    scores = predict(model, encode(tokenizer, examples, cfg.max_length), task.task_type)
    metrics = classification_metrics(examples.y, scores, task.task_type, ordinal=task.ordinal,
                                     n_bootstrap=cfg.bootstrap)
    out = EvalOutputs({
        "task": cfg.task, "adapter": cfg.model, "data": cfg.data, "n": len(examples.y),
        "labels": examples.labels, "auroc_ci": metrics["auroc_macro_ci"], **metrics,
    })
    print(json.dumps(out.metrics))
    return out
