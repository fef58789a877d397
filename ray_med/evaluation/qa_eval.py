"""The ``evaluate.py qa`` task: a causal LM (+ LoRA adapter) answering a QA file in one mode.

It loads the model and adapter with :func:`~ray_med.adapters.host.load_lm`, as the LM
deployment does, and answers with the same functions, so ``/v1/qa`` gives the same
answer for the same item, mode and seed. The per-item predictions go beside the
adapter (or the model), i.e. into the run folder of the job that wrote it, never into
the working directory unless ``predictions`` names a path there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ray_med.adapters.host import load_lm
from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.errors import ConfigError, DataError
from ray_med.evaluation.config import EvalOutputs, QAEvalConfig
from ray_med.evaluation.qa import QAResult, answer_items, qa_metrics
from ray_med.tasks import get_task, item_from_record, prompt_formats, task_for_format
from ray_med.tasks.prompts import QAItem


def predictions_path(cfg: QAEvalConfig) -> Path | None:
    """Where the predictions go: ``cfg.predictions``, else ``qa/<name>.jsonl`` in the folder holding the adapter or model.

    A model ``runs/pretrain-<hash>/model`` puts them in ``runs/pretrain-<hash>/qa/``; the
    name carries the data file, mode, shots and seed, so evaluations do not overwrite each other.
    """
    if cfg.predictions is not None:
        return Path(cfg.predictions) if cfg.predictions else None
    owner = cfg.adapter or cfg.model
    if "://" in owner and not owner.startswith("pkg://"):
        raise ConfigError(f"{owner} is not a local folder to write predictions beside; set predictions=PATH")
    folder = Path(resolve_path(owner)).parent / "qa"
    writable = folder.parent
    if not (writable.is_dir() and os.access(writable, os.W_OK)) or owner.startswith("pkg://"):
        raise ConfigError(f"cannot write predictions beside {owner} ({writable} is not writable); "
                          "set predictions=PATH (or predictions='' for none)")
    stem = Path(cfg.data).name.split(".")[0] or "data"
    return folder / f"{stem}-{cfg.qa.mode}-{cfg.qa.shots}shot-seed{cfg.qa.seed}.jsonl"


def qa_task(cfg: QAEvalConfig, answer: Callable[[list[QAItem], list[QAItem]], list[QAResult]] | None = None,
            ) -> EvalOutputs:
    """Accuracy (all items and answered ones), abstentions, and a per-item predictions JSONL.

    ``answer(items, pool)``: another engine's answers (``engine: vllm``, see
    :mod:`ray_med.serving.deployments.vllm`); by default the model is loaded here and
    answered with :func:`~ray_med.evaluation.qa.answer_items`.
    """
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
    if answer is not None:
        path = predictions_path(cfg)
        results = answer(items, pool)
    else:
        lm = load_lm(cfg.model, {"adapter": cfg.adapter} if cfg.adapter else {})
        with lm.use("adapter" if cfg.adapter else None) as model:
            # Once the model and adapter loaded (a missing one is reported as such), before answering.
            path = predictions_path(cfg)
            results = answer_items(model, lm.tokenizer, items, cfg.qa, pool=pool, batch_size=cfg.batch_size,
                                   decode_batch=cfg.decode_batch)
    metrics = {"task": "qa", "model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "format": cfg.format,
               "mode": cfg.qa.mode, "shots": cfg.qa.shots, "seed": cfg.qa.seed, **qa_metrics(items, results)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: an interrupted run leaves the previous file or none.
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("w") as f:
                for it, r in zip(items, results, strict=True):
                    row = {"id": it.id, "question": it.question, "context": it.context, "options": it.options,
                           "gold": it.answer, **r.to_dict(), "samples": r.samples or None}
                    f.write(json.dumps(row) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        metrics["predictions"] = str(path)
    print(json.dumps(metrics))
    return EvalOutputs(metrics)
