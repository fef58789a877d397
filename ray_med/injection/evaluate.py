"""``evaluate.py multimodal`` for both kinds of multimodal model: a LLaVA folder, or an injected model (+ adapter).

An injected model folder (``injected_config.json``) carries its tasks (seen and unseen,
with their texts and answer words). ``--task`` names one of them; the file is read with
``--format`` into the task's modality inputs exactly as the federation read its own
(:func:`ray_med.federated.data.to_inputs`), and each item is scored by top token over
the answer words: macro AUROC with a bootstrap CI, and accuracy. ``--adapter`` is the
job's ``adapter/`` (M3OE or LoRA) or a ``folded/<task>/`` LoRA. Any other folder goes to
the LLaVA evaluation (:func:`ray_med.evaluation.multimodal_eval.multimodal_task`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.data.readers import medmnist_splits, reader_options
from ray_med.errors import ConfigError, DataError
from ray_med.evaluation.config import EvalOutputs, MultimodalEvalConfig
from ray_med.evaluation.multimodal_eval import multimodal_task as llava_task
from ray_med.federated.data import to_inputs
from ray_med.injection.model import Encoder, choice_probs, is_injected_folder, load_injected
from ray_med.injection.train import task_auroc
from ray_med.tasks import get_task, task_data


def multimodal_task(cfg: MultimodalEvalConfig) -> EvalOutputs:
    """Score ``cfg.model`` on ``cfg.data``: an injected model here, a LLaVA model in the multimodal evaluation."""
    if not is_injected_folder(cfg.model):
        if cfg.adapter:
            raise ConfigError("--adapter applies to an injected model (jobs/inject.py's <output_dir>/model); a "
                              "LLaVA model folder carries its weights merged")
        return llava_task(cfg)
    return injected_task(cfg)


def injected_task(cfg: MultimodalEvalConfig) -> EvalOutputs:

    data_path = resolve_path(cfg.data)  # pkg://sklearn/... names the breast-cancer CSV scikit-learn ships
    if not Path(data_path).exists():
        raise DataError(f"{cfg.data}: file not found")
    model, tokenizer, tasks = load_injected(cfg.model, cfg.adapter)
    if cfg.task not in tasks:
        raise ConfigError(f"the injected model knows the tasks {sorted(tasks)}, not {cfg.task!r}")
    task = tasks[cfg.task]
    enc_cfg = json.loads((Path(cfg.model) / "encoders" / task.modality / "config.json").read_text())
    source = get_task(enc_cfg["source"]["task"])
    if source.reader != cfg.format:
        raise ConfigError(f"task {cfg.task} reads {source.reader} files (its {task.modality} encoder's), "
                          f"not {cfg.format}")
    options = None
    if cfg.split is not None:
        if "splits" not in reader_options(cfg.format):
            raise DataError(f"--split applies to files with splits (medmnist), not the {cfg.format} reader")
        options = {"splits": [cfg.split]}
    elif cfg.format == "medmnist" and len(medmnist_splits(data_path)) > 1:
        raise DataError(f"{cfg.data} holds the splits {medmnist_splits(data_path)}: pick one with --split")
    records = read_records(cfg.format, data_path, options=options).records
    data = task_data(source, records, labels=task.labels)
    if cfg.limit is not None:
        data = data.take(np.arange(min(cfg.limit, len(data.y))))
    if len(data.y) == 0:
        raise DataError(f"{cfg.data}: no {cfg.task} items to score")
    x = to_inputs(data.texts, task.modality, image_size=int(enc_cfg.get("image_size", 28)),
                  max_length=int(enc_cfg.get("max_length", 128)))
    enc = Encoder(tokenizer, {task.name: task}, model.modality_texts, model.n_tokens)
    items = [enc.item(task.name, x[i], int(data.y[i]), str(i)) for i in range(len(data.y))]
    probs = choice_probs(model, items, enc.pad, batch_size=cfg.batch_size)
    m = task_auroc(probs, items, n_bootstrap=cfg.bootstrap, seed=cfg.seed)
    metrics = {k: v for k, v in m.items() if not k.startswith("auroc_labels")}
    metrics.update(task=task.name, seen=task.seen, modality=task.modality, data=cfg.data, split=cfg.split,
                   adapter=cfg.adapter)
    lo, hi = metrics["auroc_macro_ci"]
    print(f"{task.name} ({'seen' if task.seen else 'unseen'}): macro AUROC {metrics['auroc_macro']:.4f} "
          f"[{lo:.4f}, {hi:.4f}], accuracy {metrics['accuracy']:.4f} on {metrics['n']} items")
    print(json.dumps(metrics, default=float))
    return EvalOutputs(metrics=metrics)
