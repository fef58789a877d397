"""Readers of numeric rows: tabular features and 1-D signals, as records with ``meta["features"]``.

* ``breast_cancer_csv``: the Wisconsin Diagnostic Breast Cancer table in the CSV that
  scikit-learn ships (``pkg://sklearn/datasets/data/breast_cancer.csv``): a first line
  ``n_samples,n_features,<class names...>``, then rows of the features and the class index.
* ``mitbih_csv``: heartbeats in the schema of the public Kaggle "ECG Heartbeat
  Categorization" files (``mitbih_train.csv`` from the MIT-BIH Arrhythmia Database): no
  header, 187 samples of one beat at 125 Hz scaled to [0, 1] and zero-padded, then the
  AAMI class as a float (0 N, 1 S, 2 V, 3 F, 4 Q).

A malformed row (a wrong field count, a value that is not a number, an unknown class)
goes to the record errors like any other reader's.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator

from ray_med.data.policy import RecordErrors
from ray_med.data.records import Record
from ray_med.errors import DataError

MITBIH_CLASSES = ("N", "S", "V", "F", "Q")
"""AAMI heartbeat classes in the Kaggle files' label order."""
MITBIH_SAMPLES = 187


def _floats(values: list[str]) -> list[float] | None:
    try:
        out = [float(v) for v in values]
    except ValueError:
        return None
    return out if all(math.isfinite(v) for v in out) else None


def read_breast_cancer_csv(path: str, errors: RecordErrors, *, source: str = "breast_cancer_csv") -> Iterator[Record]:
    """scikit-learn's ``breast_cancer.csv``: label names from its first line, then features + class index."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        head = next(rows, None)
        if not head or len(head) < 4 or not head[0].strip().isdigit() or not head[1].strip().isdigit():
            raise DataError(f"{path}: expected a first line 'n_samples,n_features,<class names...>', got {head}")
        n_features, names = int(head[1]), [h.strip() for h in head[2:]]
        for i, row in enumerate(rows, start=2):
            where = f"line {i}"
            if not row:
                continue
            if len(row) != n_features + 1:
                errors.bad(where, f"{len(row)} fields, expected {n_features} features and a class")
                continue
            values = _floats(row[:-1])
            label = row[-1].strip()
            if values is None or not label.isdigit() or int(label) >= len(names):
                errors.bad(where, f"features must be numbers and the class one of 0..{len(names) - 1}")
                continue
            yield Record(id=str(i - 2), source=source, label=names[int(label)], meta={"features": values})


def read_mitbih_csv(path: str, errors: RecordErrors, *, source: str = "mitbih_csv") -> Iterator[Record]:
    """Kaggle's MIT-BIH heartbeat CSV: 187 samples then the AAMI class (0-4), no header."""
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f), start=1):
            where = f"line {i}"
            if not row:
                continue
            if len(row) != MITBIH_SAMPLES + 1:
                errors.bad(where, f"{len(row)} fields, expected {MITBIH_SAMPLES} samples and a class")
                continue
            values = _floats(row)
            if values is None or values[-1] not in range(len(MITBIH_CLASSES)):
                errors.bad(where, f"samples must be numbers and the class one of 0..{len(MITBIH_CLASSES) - 1}")
                continue
            yield Record(id=str(i - 1), source=source, label=MITBIH_CLASSES[int(values[-1])],
                         meta={"features": values[:-1]})
