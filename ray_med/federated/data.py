"""A modality's data as arrays, read where it is used: the plan (labels and splits) and a client's rows. No Ray.

Each modality names a registered task (``ray_med.tasks``: ``pneumonia``, ``breast_cancer``,
``mtsamples_specialty``, ``heartbeat``, ...) and a file in that task's reader format. The
records become model inputs here, and only here:

* image: the one image preprocessing (:func:`ray_med.data.images.preprocess`) at the
  encoder's size: (N, 3, S, S) float32;
* text: MiniLM's tokenizer: (N, 2, L) int64, the ids and the attention mask;
* tabular, signal: the record's ``meta.features``: (N, F) float32.

:func:`plan_modality` runs once per federation (on the cluster, in a Ray task) and
returns labels, splits and each client's row positions: no features. Clients call
:func:`modality_arrays`, cached per process, so a pool actor that runs a thousand
virtual clients reads the file once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.data.images import ImageSpec, preprocess
from ray_med.errors import ConfigError, DataError
from ray_med.federated.models import MINILM
from ray_med.federated.partition import fedkim_split, partition
from ray_med.tasks import get_task, task_data

MODALITY_OF_READER = {"medmnist": "image", "image_csv": "image", "dicom": "image", "breast_cancer_csv": "tabular",
                      "mitbih_csv": "signal"}


def modality_of_task(task_name: str) -> str:
    """The modality a task's inputs are (its reader's kind; text for the text readers)."""
    return MODALITY_OF_READER.get(get_task(task_name).reader, "text")


@dataclass
class ModalityArrays:
    x: np.ndarray
    y: np.ndarray
    labels: list[str]


def _reader_options(reader: str, split: str | None) -> dict | None:
    return {"splits": [split]} if reader == "medmnist" and split else None


@functools.lru_cache(maxsize=8)
def _records(task_name: str, path: str, split: str | None, on_error: str = "raise") -> tuple[list, list[str], np.ndarray]:
    task = get_task(task_name)
    result = read_records(task.reader, path, options=_reader_options(task.reader, split), on_error=on_error)
    data = task_data(task, result.records)
    if len(data.y) == 0:
        raise DataError(f"{path}: no usable {task_name} examples")
    return data.texts, data.labels, data.y


def read_labels(task_name: str, path: str, split: str | None = None, on_error: str = "raise"
                ) -> tuple[np.ndarray, list[str]]:
    """The labels (indices) and label names of a task's file."""
    _, labels, y = _records(task_name, resolve_path(path), split, on_error)
    return y, labels


@functools.lru_cache(maxsize=8)
def modality_arrays(task_name: str, path: str, split: str | None, modality: str, image_size: int = 28,
                    max_length: int = 128, on_error: str = "raise") -> ModalityArrays:
    """Every row of the file as model inputs (cached per process: many virtual clients share one read)."""
    inputs, labels, y = _records(task_name, resolve_path(path), split, on_error)
    return ModalityArrays(x=to_inputs(inputs, modality, image_size=image_size, max_length=max_length), y=y,
                          labels=labels)


def to_inputs(inputs: list, modality: str, *, image_size: int = 28, max_length: int = 128) -> np.ndarray:
    """A task's raw inputs (PNG bytes, texts, feature lists) as the encoder's input array."""
    if modality == "image":
        spec = ImageSpec(image_size)
        return np.stack([preprocess(img, spec) for img in inputs]).astype(np.float32)
    if modality == "text":
        from ray_med.models.loading import load_tokenizer  # lazy: transformers loads only for a text modality

        tok = load_tokenizer(resolve_path(MINILM))
        enc = tok(list(inputs), truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
        return np.stack([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.int64)
    try:
        x = np.asarray(inputs, dtype=np.float32)
    except ValueError:
        x = np.zeros(0)
    if x.ndim != 2:
        raise DataError(f"{modality} rows must all have the same number of numeric features")
    return x


def plan_modality(task_name: str, path: str, split: str | None, clients: list[str], *, scheme: str, alpha: float,
                  seed: int, ratios: tuple[float, ...], on_error: str = "raise") -> dict:
    """Labels, the 7:1:1:1 split and each client's rows of the private split (positions into the file's rows)."""
    y, labels = read_labels(task_name, path, split, on_error)
    splits = fedkim_split(y, seed, ratios)
    private = splits["private"]
    parts = partition(y[private], clients, scheme, seed=seed, alpha=alpha)
    return {"labels": labels, "n": int(len(y)), "splits": splits,
            "clients": {c: private[idx] for c, idx in parts.items()}}


def feature_stats(task_name: str, path: str, split: str | None, rows: np.ndarray, on_error: str = "raise"
                  ) -> tuple[list[float], list[float]]:
    """Mean and std of each feature over ``rows`` (the public split: the server's own data)."""
    arr = modality_arrays(task_name, resolve_path(path), split, "tabular", on_error=on_error).x[rows]
    std = arr.std(0)
    std[std == 0] = 1.0
    return arr.mean(0).tolist(), std.tolist()


def check_modality(modality: str, task_name: str) -> None:
    """A task whose inputs are not this modality's fails before anything starts."""
    kind = modality_of_task(task_name)
    if kind != modality:
        raise ConfigError(f"modality {modality}: task {task_name} reads {kind} inputs")
