"""The ``evaluate.py qa`` task: a causal LM (+ LoRA adapter) answering a QA file in one mode.

It loads the model and adapter exactly as the LM deployment does
(:class:`~ray_med.serving.engines.LMEngine`) and answers with the same functions, so
``/v1/qa`` gives the same answer for the same item, mode and seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_med.data import read_records
from ray_med.errors import DataError
from ray_med.evaluation.qa import FORMATS, QAConfig, answer_items, item_from_record, qa_metrics


def qa_task(
    model: str, data: str, fmt: str, cfg: QAConfig, *, adapter: str | None = None, shots_file: str | None = None,
    predictions: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
) -> dict[str, Any]:
    """Accuracy (all items and answered ones), abstentions, and a per-item predictions JSONL."""
    from ray_med.serving.engines import LMEngine

    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)} for qa, got {fmt!r}")
    items = [item_from_record(r) for r in read_records(fmt, data).records]
    if limit:
        items = items[:limit]
    if not items:
        raise DataError(f"{data}: no questions")
    if cfg.shots > 0 and not shots_file:
        # Exemplars from the evaluated file would put its gold answers into the prompts.
        raise DataError("--shots needs --shots-file (exemplars from a training split, not the evaluated file)")
    pool = [item_from_record(r) for r in read_records(fmt, shots_file).records] if shots_file else []
    engine = LMEngine(model, {"adapter": adapter} if adapter else {}, qa=cfg)
    name = None
    if adapter:
        engine.load_adapter("adapter")
        name = "adapter"
    with engine.host.use(name) as lm:
        results = answer_items(lm, engine.tokenizer, items, cfg, pool=pool, batch_size=batch_size)
    metrics = {"task": "qa", "model": model, "adapter": adapter, "data": data, "format": fmt, "mode": cfg.mode,
               "shots": cfg.shots, "seed": cfg.seed, **qa_metrics(items, results)}
    if predictions:
        path = Path(predictions)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for it, r in zip(items, results, strict=True):
                row = {"id": it.id, "question": it.question, "context": it.context, "options": it.options,
                       "gold": it.answer, **r.to_dict(), "samples": r.samples or None}
                f.write(json.dumps(row) + "\n")
        metrics["predictions"] = str(path)
    return metrics
