"""The ``evaluate.py qa`` task: a causal LM (+ LoRA adapter) answering a QA file in one mode.

It loads the model and adapter with :func:`~ray_med.adapters.host.load_lm`, as the LM
deployment does, and answers with the same functions, so ``/v1/qa`` gives the same
answer for the same item, mode and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_med.adapters.host import load_lm
from ray_med.data import read_records
from ray_med.errors import DataError
from ray_med.evaluation.config import EvalOutputs, QAEvalConfig
from ray_med.evaluation.qa import answer_items, qa_metrics
from ray_med.tasks import get_task, item_from_record, prompt_formats, task_for_format


def qa_task(cfg: QAEvalConfig) -> EvalOutputs:
    """Accuracy (all items and answered ones), abstentions, and a per-item predictions JSONL."""
    task = get_task(cfg.task) if cfg.task else task_for_format(cfg.format)
    if task is None or not task.prompt:
        raise DataError(f"--format must be one of {', '.join(prompt_formats())} for qa, got {cfg.format!r}")
    items = [item_from_record(r) for r in read_records(cfg.format, cfg.data).records]
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise DataError(f"{cfg.data}: no questions")
    if cfg.qa.shots > 0 and not cfg.shots_file:
        # Exemplars from the evaluated file would put its gold answers into the prompts.
        raise DataError("--shots needs --shots-file (exemplars from a training split, not the evaluated file)")
    pool = [item_from_record(r) for r in read_records(cfg.format, cfg.shots_file).records] if cfg.shots_file else []
    lm = load_lm(cfg.model, {"adapter": cfg.adapter} if cfg.adapter else {})
    with lm.use("adapter" if cfg.adapter else None) as model:
        results = answer_items(model, lm.tokenizer, items, cfg.qa, pool=pool, batch_size=cfg.batch_size)
    metrics = {"task": "qa", "model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "format": cfg.format,
               "mode": cfg.qa.mode, "shots": cfg.qa.shots, "seed": cfg.qa.seed, **qa_metrics(items, results)}
    if cfg.predictions:
        path = Path(cfg.predictions)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for it, r in zip(items, results, strict=True):
                row = {"id": it.id, "question": it.question, "context": it.context, "options": it.options,
                       "gold": it.answer, **r.to_dict(), "samples": r.samples or None}
                f.write(json.dumps(row) + "\n")
        metrics["predictions"] = str(path)
    print(json.dumps(metrics))
    return EvalOutputs(metrics)
