"""A task as a classifier sees it: (text, text_pair) inputs and label indices, stratified splits, class weights.

:func:`task_data` turns records into aligned inputs and targets (label indices, or 0/1
rows for multi-label) for any :class:`~ray_med.tasks.registry.Task`;
:func:`stratified_split` makes the dev/test splits and :func:`class_weights` the
N/(K·n_k) weights of the weighted cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_med.data.records import Record
from ray_med.errors import ConfigError, DataError
from ray_med.tasks.registry import Task


def _field(record: Record, name: str) -> Any:
    if name.startswith("meta."):
        return record.meta.get(name[5:])
    return getattr(record, name)


@dataclass
class TaskData:
    """A task's inputs and targets, aligned."""

    ids: list[str]
    texts: list[str]
    pairs: list[str] | None
    y: np.ndarray
    """(n,) label indices, or (n, L) 0/1 for multi-label."""
    labels: list[str]

    def take(self, idx: np.ndarray) -> TaskData:
        """The examples at ``idx`` (a split), with the same label space."""
        return TaskData(
            ids=[self.ids[i] for i in idx], texts=[self.texts[i] for i in idx],
            pairs=[self.pairs[i] for i in idx] if self.pairs is not None else None, y=self.y[idx],
            labels=self.labels,
        )


def task_data(task: Task, records: list[Record], labels: list[str] | None = None) -> TaskData:
    """Inputs and targets of ``records``; records with a label outside the space are dropped.

    ``labels`` fixes the label space (use the training split's for the dev/test splits).
    """
    if labels is None:
        if task.labels is not None:
            labels = list(task.labels)
        else:
            counts: dict[str, int] = {}
            for r in records:
                values = _field(r, task.label_field) or []
                for v in values if task.task_type == "multilabel" else [values]:
                    counts[v] = counts.get(v, 0) + 1
            labels = sorted(k for k, c in counts.items() if c >= task.min_count and k)
    if len(labels) < 2:
        raise DataError(f"task {task.name}: fewer than two labels with at least {task.min_count} examples")
    index = {lab: i for i, lab in enumerate(labels)}
    ids, texts, pairs, ys = [], [], [], []
    for r in records:
        text = _field(r, task.text)
        pair = _field(r, task.text_pair) if task.text_pair else None
        if not text or (task.text_pair and not pair):
            continue
        value = _field(r, task.label_field)
        if task.task_type == "multilabel":
            row = np.zeros(len(labels), dtype=np.float32)
            for v in value or []:
                if v in index:
                    row[index[v]] = 1.0
            ys.append(row)
        else:
            if value not in index:
                continue
            ys.append(index[value])
        ids.append(r.id)
        texts.append(text)
        pairs.append(pair)
    y = np.stack(ys) if task.task_type == "multilabel" and ys else np.asarray(ys, dtype=np.int64)
    return TaskData(ids=ids, texts=texts, pairs=pairs if task.text_pair else None, y=y, labels=labels)


def stratified_split(y: np.ndarray, n_dev: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, dev) indices with class proportions kept in the dev split (first label for multi-label)."""
    rng = np.random.default_rng(seed)
    strata = y if y.ndim == 1 else y.argmax(axis=1)
    n = len(strata)
    if not 0 < n_dev < n:
        raise DataError(f"cannot take {n_dev} dev examples out of {n}")
    dev: list[int] = []
    classes, counts = np.unique(strata, return_counts=True)
    quotas = np.floor(counts * n_dev / n).astype(int)
    # Largest remainders get the leftover dev slots, so the dev size is exact.
    remainders = counts * n_dev / n - quotas
    for i in np.argsort(-remainders)[: n_dev - quotas.sum()]:
        quotas[i] += 1
    for cls, quota in zip(classes, quotas, strict=True):
        members = np.flatnonzero(strata == cls)
        dev.extend(rng.choice(members, size=quota, replace=False).tolist())
    dev_idx = np.sort(np.asarray(dev))
    train_idx = np.setdiff1d(np.arange(n), dev_idx)
    return train_idx, dev_idx


SPLIT_NAMES = ("train", "dev", "test")


def split_count(size: float, n: int) -> int:
    """A split size as a number of the ``n`` examples: a fraction in (0, 1) of them, or a count >= 1."""
    if isinstance(size, float):
        return round(size * n)
    return int(size)


@dataclass
class Splits:
    """Indices of the train, dev and test splits of one :class:`TaskData` (disjoint, sorted)."""

    train: np.ndarray
    dev: np.ndarray
    test: np.ndarray
    seed: int

    def ids(self, data: TaskData) -> dict[str, list[str]]:
        """The record ids of each split, as ``splits.json`` holds them."""
        return {name: [data.ids[i] for i in getattr(self, name)] for name in SPLIT_NAMES}


def train_dev_test_split(
    y: np.ndarray, dev_size: float, test_size: float, seed: int = 0, *, where: str = "data"
) -> Splits:
    """Seeded stratified train/dev/test splits; each size is a fraction in (0, 1) of all examples or a count.

    The test split is drawn first from all examples, then dev from the rest, each keeping
    the class proportions (:func:`stratified_split`). A split that would be empty is a
    :class:`ConfigError` naming the key (``<where>.dev_size`` / ``<where>.test_size``).
    """
    n = len(y)
    n_dev, n_test = split_count(dev_size, n), split_count(test_size, n)
    for key, size, count in (("test_size", test_size, n_test), ("dev_size", dev_size, n_dev)):
        if count < 1:
            raise ConfigError(f"{where}.{key}={size} selects no example of {n}: the {key[:-5]} split would be "
                              f"empty; give a count >= 1 or a larger fraction")
    if n - n_dev - n_test < 1:
        raise ConfigError(f"{where}.dev_size={dev_size} ({n_dev}) + {where}.test_size={test_size} ({n_test}) "
                          f"leave no training example of {n}; make them smaller")
    rest, test = stratified_split(y, n_test, seed=seed)
    # A different stream for dev, so dev is not the test draw repeated on the rest.
    train_rel, dev_rel = stratified_split(y[rest], n_dev, seed=seed + 1)
    return Splits(train=rest[train_rel], dev=rest[dev_rel], test=test, seed=seed)


def class_weights(y: np.ndarray, num_labels: int) -> np.ndarray:
    """N / (K * n_k): balanced class weights for cross-entropy (classes absent get weight 0)."""
    counts = np.bincount(y, minlength=num_labels).astype(np.float64)
    with np.errstate(divide="ignore"):
        w = len(y) / (num_labels * counts)
    w[~np.isfinite(w)] = 0.0
    return w
