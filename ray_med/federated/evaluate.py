"""``evaluate.py federated``: a global modality model on a task's file; the metrics as the last stdout line."""

from __future__ import annotations

import json
from pathlib import Path

from ray_med.data import read_records
from ray_med.data.readers import medmnist_splits, reader_options
from ray_med.errors import ConfigError, DataError
from ray_med.evaluation.config import EvalOutputs
from ray_med.evaluation.metrics import classification_metrics
from ray_med.federated.client import predict
from ray_med.federated.config import FederatedEvalConfig
from ray_med.federated.data import modality_of_task, to_inputs
from ray_med.federated.models import ENCODERS, load_modality
from ray_med.runtime import is_uri, localize
from ray_med.tasks import get_task, task_data


def _folder(cfg: FederatedEvalConfig) -> Path:
    modality = cfg.modality or modality_of_task(cfg.task)
    if is_uri(cfg.model):  # remote storage commits each modality folder, not global/ itself
        last = cfg.model.rstrip("/").rsplit("/", 1)[-1]
        uri = cfg.model if last in ENCODERS else f"{cfg.model.rstrip('/')}/{modality}"
        return Path(localize(uri, what="federated modality folder"))
    root = Path(cfg.model)
    if (root / "config.json").is_file():
        return root
    folder = root / modality
    if not folder.is_dir():
        held = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
        raise ConfigError(f"{root}: no {modality} model (it holds {held or 'none'})")
    return folder


def federated_task(cfg: FederatedEvalConfig) -> EvalOutputs:
    task = get_task(cfg.task)
    if task.reader != cfg.format:
        raise ConfigError(f"task {cfg.task} reads {task.reader} files, not {cfg.format}")
    if not Path(cfg.data).exists():
        raise DataError(f"{cfg.data}: file not found")
    model = load_modality(_folder(cfg))
    if cfg.task not in model.spec.tasks:
        raise ConfigError(f"the {model.spec.modality} model has heads for {sorted(model.spec.tasks)}, not {cfg.task}")
    options = None
    if cfg.split is not None:
        if "splits" not in reader_options(cfg.format):
            raise DataError(f"--split applies to files with splits (medmnist), not the {cfg.format} reader")
        options = {"splits": [cfg.split]}
    elif cfg.format == "medmnist":
        splits = medmnist_splits(cfg.data)
        if len(splits) > 1:  # scoring all of them would mix training rows into the numbers
            raise DataError(f"{cfg.data} holds the splits {splits}: pick the one to score with --split")
    records = read_records(cfg.format, cfg.data, options=options).records
    data = task_data(task, records, labels=model.spec.tasks[cfg.task])
    if len(data.y) == 0:
        raise DataError(f"{cfg.data}: no {cfg.task} items to score")
    spec = model.spec
    x = to_inputs(data.texts, spec.modality, image_size=spec.image_size, max_length=spec.max_length)
    probs = predict(model, cfg.task, x)
    m = classification_metrics(data.y, probs, task.task_type, n_bootstrap=cfg.bootstrap, seed=cfg.seed)
    metrics = {k: v for k, v in m.items() if not k.startswith("auroc_labels")}
    metrics.update(task=cfg.task, modality=spec.modality, data=cfg.data, split=cfg.split)
    lo, hi = metrics["auroc_macro_ci"]
    print(f"{cfg.task}: macro AUROC {metrics['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}], macro F1 "
          f"{metrics['f1_macro']:.4f}, accuracy {metrics['accuracy']:.4f} on {metrics['n']} items")
    print(json.dumps({**metrics, "auroc_ci": metrics["auroc_macro_ci"]}, default=float))
    return EvalOutputs(metrics=metrics)
