"""``evaluate.py multimodal``: a saved multimodal model on one task's file, scored as MultiMedBench scores it.

Classification by top token over the option letters (a probability per class: macro
AUROC with a bootstrap CI, macro F1, accuracy), VQA by BLEU-1 and token F1, reports by
BLEU and ROUGE-L (:func:`ray_med.evaluation.multimodal.score_task`, the same code the
training job scores its held-out files with). Per-item predictions go to a JSONL file;
the metrics are the last stdout line, as one JSON object.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ray_med.data import read_records
from ray_med.data.readers import medmnist_splits, reader_options
from ray_med.errors import DataError
from ray_med.evaluation.config import EvalOutputs, MultimodalEvalConfig
from ray_med.evaluation.multimodal import ModelGeometry, score_task
from ray_med.models.vlm import add_image_token, load_vlm
from ray_med.tasks import get_multimodal_task
from ray_med.tasks.instructions import make_example


def _finite(value: Any) -> Any:
    """NaN and infinities as null: the last line must be JSON (an AUROC is undefined on one class)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def multimodal_task(cfg: MultimodalEvalConfig) -> EvalOutputs:
    """Score ``cfg.model`` on ``cfg.data``; print the metrics as the last line."""
    task = get_multimodal_task(cfg.task)
    if not Path(cfg.data).exists():
        raise DataError(f"{cfg.data}: file not found")
    options = {}
    if cfg.split is not None:
        if "splits" not in reader_options(cfg.format):
            raise DataError(f"--split applies to files with splits (medmnist), not the {cfg.format} reader")
        options["splits"] = [cfg.split]
    elif cfg.format == "medmnist":
        splits = medmnist_splits(cfg.data)
        if len(splits) > 1:  # scoring all of them would mix training items into the numbers
            raise DataError(f"{cfg.data} holds the splits {splits}: pick the one to score with --split")
    records = read_records(cfg.format, cfg.data, options=options or None).records
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise DataError(f"{cfg.data}: no items to score")
    model, tokenizer = load_vlm(cfg.model)
    add_image_token(tokenizer)
    examples = [make_example(task, r) for r in records]
    metrics, preds = score_task(model, tokenizer, task, examples, ModelGeometry.of(model.config),
                                max_length=cfg.max_length, bootstrap=cfg.bootstrap, seed=cfg.seed,
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    path = cfg.predictions
    if path is None:
        stem = Path(cfg.data).stem + (f"-{cfg.split}" if cfg.split else "")
        path = str(Path(cfg.model).parent / "eval" / f"{task.name}-{stem}.jsonl")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(p) + "\n" for p in preds))
    metrics.update(task=task.name, data=cfg.data, split=cfg.split, predictions=path or None)
    if "auroc_macro" in metrics:
        lo, hi = metrics["auroc_macro_ci"]
        print(f"{task.name}: macro AUROC {metrics['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}], macro F1 "
              f"{metrics['f1_macro']:.4f}, accuracy {metrics['accuracy']:.4f} on {metrics['n']} items")
    print(json.dumps(_finite(metrics), default=float))
    return EvalOutputs(metrics=metrics)
