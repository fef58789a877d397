"""A sweep's report: one row per trial, the summary table, trials.csv, the plots, the best trial (no Ray).

Each trial's row comes from what it reported each epoch (dev macro AUROC) and how it
ended. A trial's status is one of:

* ``completed``: it ran every epoch and wrote its classifier;
* ``early_stopped``: its own patience on dev AUROC ended it, and it wrote its classifier;
* ``stopped``: the scheduler (ASHA) or the time budget ended it before it finished, so it
  wrote nothing;
* ``failed``: it raised; ``error`` holds the one-line reason.

The best trial is the one with the highest best dev AUROC among those that wrote a
classifier (a stopped trial has none to export). Dev selected it, so the metric it is
reported on is its test split's, scored once by its worker.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The object-oriented API needs no display and no backend choice (cluster nodes have neither).
from matplotlib.figure import Figure

STATUSES = ("completed", "early_stopped", "stopped", "failed")
METRIC = "dev_auroc"


@dataclass
class TrialRow:
    """One trial: its sampled values, its per-epoch dev metric, and how it ended."""

    trial_id: str
    params: dict[str, Any]
    history: list[float] = field(default_factory=list)
    """Dev macro AUROC after each epoch it ran."""
    status: str = "stopped"
    reason: str = ""
    error: str = ""
    attempts: int = 1
    """How many times it started (more than one: resumed after an interruption)."""

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def best(self) -> float | None:
        finite = [v for v in self.history if v is not None and math.isfinite(v)]
        return max(finite) if finite else None

    @property
    def best_epoch(self) -> int | None:
        best = self.best
        return None if best is None else self.history.index(best) + 1

    @property
    def exported(self) -> bool:
        return self.status in ("completed", "early_stopped")


def row_record(r: TrialRow) -> dict[str, Any]:
    """A row as plain data (the job's outputs, run.json)."""
    return {"trial_id": r.trial_id, "params": r.params, "history": r.history, "status": r.status,
            "reason": r.reason, "error": r.error, "attempts": r.attempts, "best_dev_auroc": r.best,
            "best_epoch": r.best_epoch, "epochs_run": r.epochs}


def rows_from_outputs(records: Sequence[dict[str, Any]]) -> list[TrialRow]:
    """The rows back from :func:`row_record`'s records."""
    return [TrialRow(r["trial_id"], r["params"], list(r.get("history") or []), r["status"], r.get("reason", ""),
                     r.get("error", ""), r.get("attempts", 1)) for r in records]


def end_status(*, error: str, finished: bool, epochs_run: int, max_epochs: int, stopper: str) -> tuple[str, str]:
    """(status, reason) of a trial from how it ended.

    ``finished``: its worker wrote the classifier and the metrics; ``stopper``: what
    stops unfinished trials in this sweep ("ASHA", "the time budget", ...).
    """
    if error:
        return "failed", error
    if finished:
        if epochs_run < max_epochs:
            return "early_stopped", f"patience: dev AUROC stopped improving after epoch {epochs_run}"
        return "completed", f"ran all {max_epochs} epochs"
    return "stopped", f"stopped by {stopper} after epoch {epochs_run}"


def best_trial(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The exported trial with the highest best dev AUROC (ties: the first)."""
    candidates = [r for r in rows if r.exported and r.best is not None]
    return max(candidates, key=lambda r: r.best) if candidates else None  # type: ignore[arg-type, return-value]


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def trials_csv(rows: Sequence[TrialRow], params: Sequence[str]) -> str:
    """trials.csv: one row per trial (its values, best dev AUROC, its epoch, epochs run, status, reason)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", *params, f"best_{METRIC}", "best_epoch", "epochs_run", "status", "reason", "attempts"])
    for r in rows:
        w.writerow([r.trial_id, *(_value(r.params.get(p)) for p in params),
                    "" if r.best is None else f"{r.best:.6f}", r.best_epoch or "", r.epochs, r.status,
                    r.reason, r.attempts])
    return buf.getvalue()


def summary_table(rows: Sequence[TrialRow], params: Sequence[str], best: TrialRow | None = None) -> str:
    """The trials as a Markdown table, best dev AUROC first."""
    short = [p.rsplit(".", 1)[-1] if sum(q.rsplit(".", 1)[-1] == p.rsplit(".", 1)[-1] for q in params) == 1
             else p for p in params]
    lines = ["| trial | " + " | ".join(short) + " | best dev AUROC | epochs | status |",
             "|---|" + "---|" * len(params) + "---|---|---|"]
    order = sorted(rows, key=lambda r: -(r.best if r.best is not None else -math.inf))
    for r in order:
        mark = " **best**" if best is not None and r.trial_id == best.trial_id else ""
        score = "-" if r.best is None else f"{r.best:.4f}"
        lines.append(f"| {r.trial_id}{mark} | " + " | ".join(_value(r.params.get(p)) for p in params)
                     + f" | {score} | {r.epochs} | {r.status} |")
    return "\n".join(lines)


def progress_line(trial_id: str, params: dict[str, Any], *, status: str, best: float | None, epochs: int,
                  note: str, done: int, total: int | None) -> str:
    """The line printed when a trial ends."""
    values = " ".join(f"{p.rsplit('.', 1)[-1]}={_value(v)}" for p, v in params.items())
    score = "no dev AUROC" if best is None else f"best dev AUROC {best:.4f}"
    of = f"/{total}" if total else ""
    tail = f": {note}" if status == "failed" else f" ({note})"
    return f"[sweep] trial {done}{of} {trial_id} {status}, {score}, {epochs} epochs, {values}{tail}"


def plot_curves(rows: Sequence[TrialRow], path: Path, *, stopper: str) -> None:
    """Dev AUROC against epoch for every trial; a stopped trial's last point is an x."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    best = best_trial(rows)
    for r in rows:
        if not r.history:
            continue
        xs = list(range(1, len(r.history) + 1))
        is_best = best is not None and r.trial_id == best.trial_id
        (line,) = ax.plot(xs, r.history, marker="o", ms=3, lw=2.5 if is_best else 1,
                          alpha=1.0 if is_best else 0.6, label=f"{r.trial_id} (best)" if is_best else None)
        if r.status == "stopped":
            ax.plot(xs[-1], r.history[-1], marker="x", ms=9, mew=2, color=line.get_color())
    ax.plot([], [], "kx", ms=9, mew=2, label=f"stopped by {stopper}")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("dev macro AUROC")
    ax.set_title("every trial's dev AUROC by epoch")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_params(rows: Sequence[TrialRow], params: Sequence[str], folder: Path, *, log_scale: Sequence[str] = ()) -> None:
    """One plot per swept key: each trial's best dev AUROC against its value (stopped trials hollow)."""
    folder.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if r.best is not None]
    for p in params:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        values = [r.params.get(p) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs: list[Any] = values
        else:
            labels = sorted({_value(v) for v in values})
            xs = [labels.index(_value(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        for x, r in zip(xs, scored, strict=True):
            ax.scatter([x], [r.best], s=30, facecolors="none" if r.status == "stopped" else "C0",
                       edgecolors="C0")
        if numeric and p in log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel("best dev macro AUROC")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"{p.replace('.', '_')}.png", dpi=110)
