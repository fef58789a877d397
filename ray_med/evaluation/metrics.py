"""Classification metrics: macro AUROC done right, AUPRC, macro F1, accuracy, bootstrap CIs.

AUROC follows the task type, which is where Clinical LLaMA-LoRA's code went wrong:

* **binary**: the score of class 1, ``P(y=1)``;
* **multi-class**: one-vs-rest over the softmax probabilities, averaged over classes;
  ordinal buckets (length of stay) use one-vs-one (Hand & Till), which respects that
  neighbouring buckets are confusable;
* **multi-label**: per-label *sigmoid* scores (never a softmax across labels), averaged
  over labels; a label whose test set has only one class has no AUROC and is skipped,
  and the number skipped is reported.

Every metric has a percentile bootstrap 95% CI over resampled test items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

TaskType = Literal["binary", "multiclass", "multilabel"]


@dataclass
class AurocResult:
    """Macro AUROC and how many classes or labels it averaged over."""

    value: float
    used: int
    skipped: int


def macro_auroc(
    y_true: np.ndarray, scores: np.ndarray, task: TaskType, *, ordinal: bool = False
) -> AurocResult:
    """Macro AUROC for ``task``.

    ``y_true``: (n,) class indices for binary/multi-class, (n, L) 0/1 for multi-label.
    ``scores``: (n, K) class probabilities (binary: K=2, column 1 is used), or (n, L)
    per-label sigmoid probabilities for multi-label.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if task == "binary":
        if len(np.unique(y_true)) < 2:
            return AurocResult(float("nan"), 0, 1)
        pos = scores[:, 1] if scores.ndim == 2 else scores
        return AurocResult(float(roc_auc_score(y_true, pos)), 1, 0)
    if task == "multiclass":
        present = np.unique(y_true)
        if len(present) < 2:
            return AurocResult(float("nan"), 0, scores.shape[1])
        if ordinal:
            return AurocResult(_ovo_auroc(y_true, scores, present), len(present), scores.shape[1] - len(present))
        aucs = [roc_auc_score(y_true == k, scores[:, k]) for k in present]
        return AurocResult(float(np.mean(aucs)), len(aucs), scores.shape[1] - len(aucs))
    if task == "multilabel":
        aucs, skipped = [], 0
        for j in range(y_true.shape[1]):
            col = y_true[:, j]
            if col.min() == col.max():
                skipped += 1
                continue
            aucs.append(roc_auc_score(col, scores[:, j]))
        value = float(np.mean(aucs)) if aucs else float("nan")
        return AurocResult(value, len(aucs), skipped)
    raise ValueError(f"unknown task type {task!r}")


def _ovo_auroc(y_true: np.ndarray, scores: np.ndarray, present: np.ndarray) -> float:
    """Hand & Till one-vs-one: mean over class pairs of the two directed pairwise AUROCs."""
    pairs = []
    for a_i, a in enumerate(present):
        for b in present[a_i + 1 :]:
            mask = (y_true == a) | (y_true == b)
            ab = roc_auc_score(y_true[mask] == a, scores[mask, a])
            ba = roc_auc_score(y_true[mask] == b, scores[mask, b])
            pairs.append((ab + ba) / 2)
    return float(np.mean(pairs))


def _point_metrics(y_true: np.ndarray, scores: np.ndarray, task: TaskType, ordinal: bool) -> dict[str, float]:
    auroc = macro_auroc(y_true, scores, task, ordinal=ordinal)
    out = {"auroc_macro": auroc.value}
    if task == "multilabel":
        pred = (scores >= 0.5).astype(int)
        keep = [j for j in range(y_true.shape[1]) if y_true[:, j].min() != y_true[:, j].max()]
        out["auprc_macro"] = (
            float(np.mean([average_precision_score(y_true[:, j], scores[:, j]) for j in keep])) if keep else np.nan
        )
        out["f1_macro"] = float(f1_score(y_true, pred, average="macro", zero_division=0))
        out["accuracy"] = float(np.mean(pred == y_true))  # per-label accuracy
        return out
    pred = scores.argmax(axis=1)
    k = scores.shape[1]
    if task == "binary":
        out["auprc_macro"] = float(average_precision_score(y_true, scores[:, 1])) if len(set(y_true)) > 1 else np.nan
    else:
        present = [c for c in range(k) if (y_true == c).any()]
        out["auprc_macro"] = float(np.mean([average_precision_score(y_true == c, scores[:, c]) for c in present]))
    out["f1_macro"] = float(f1_score(y_true, pred, labels=list(range(k)), average="macro", zero_division=0))
    out["accuracy"] = float(accuracy_score(y_true, pred))
    return out


def classification_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    task: TaskType,
    *,
    ordinal: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC (macro), AUPRC (macro), macro F1 and accuracy, each with a bootstrap 95% CI.

    Returns ``{metric: value, metric_ci: [lo, hi], "auroc_labels_used", "auroc_labels_skipped", "n"}``.
    Bootstrap resamples where a metric is undefined (one class only) are left out of its CI.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    point = _point_metrics(y_true, scores, task, ordinal)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, n)
        with np.errstate(all="ignore"):
            try:
                m = _point_metrics(y_true[idx], scores[idx], task, ordinal)
            except ValueError:
                continue
        for key, val in m.items():
            if np.isfinite(val):
                samples[key].append(val)
    out: dict[str, Any] = {}
    for key, val in point.items():
        out[key] = val
        s = samples[key]
        out[f"{key}_ci"] = [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))] if s else [np.nan, np.nan]
    auroc = macro_auroc(y_true, scores, task, ordinal=ordinal)
    out["auroc_labels_used"] = auroc.used
    out["auroc_labels_skipped"] = auroc.skipped
    out["n"] = int(n)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))
