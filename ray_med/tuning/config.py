"""The config of ``jobs/sweep.py`` and its typed outputs (plain dataclasses, no Ray).

A sweep is a base fine-tuning config (``base`` + ``overrides``, exactly what
``jobs/finetune.py`` would load) and a search space keyed by that config's dotted paths
(``space``). A trial's config is the base plus its sampled values as ``key=value``
overrides, loaded strictly (:mod:`ray_med.tuning.space`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_med.config import format_override
from ray_med.errors import ConfigError
from ray_med.runtime import RuntimeConfig

SEARCHERS = ("random", "grid", "tpe")
SCHEDULERS = ("asha", "none")


@dataclass
class SearchSettings:
    """How trials are sampled, how many, and how many run at once."""

    algorithm: str = "tpe"
    """random (Tune's variant generator), grid (every combination of the choice lists), or tpe (Optuna's
    Tree-structured Parzen Estimator, a Bayesian searcher)."""
    num_samples: int | None = None
    """Trials to sample (random, tpe; default 8); grid: how many times the whole grid runs (default 1)."""
    max_concurrent_trials: int = 2
    """Trials running at once; each also asks for its own Ray Train workers (the base config's scaling)."""
    time_budget_s: float = 0.0
    """Stop starting and running trials after this many seconds (0: no limit); trials stopped by it are
    recorded as stopped."""
    startup_trials: int = 4
    """tpe: random trials before TPE's model takes over (Optuna's n_startup_trials)."""
    seed: int = 0
    """Seed of the searcher's sampling (random and tpe)."""

    def __post_init__(self) -> None:
        if self.algorithm not in SEARCHERS:
            raise ConfigError(f"search.algorithm must be one of {', '.join(SEARCHERS)}, got '{self.algorithm}'")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"search.num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials < 1:
            raise ConfigError(f"search.max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}")
        if self.time_budget_s < 0:
            raise ConfigError(f"search.time_budget_s must be >= 0, got {self.time_budget_s}")

    @property
    def samples(self) -> int:
        return self.num_samples or (1 if self.algorithm == "grid" else 8)


@dataclass
class SchedulerSettings:
    """Early stopping across trials."""

    name: str = "asha"
    """asha (asynchronous successive halving on the per-epoch dev metric) or none (every trial runs all its
    epochs, or until its own patience)."""
    grace_period: int = 1
    """asha: epochs every trial runs before it can be stopped."""
    reduction_factor: int = 3
    """asha: at each rung (grace_period x reduction_factor^k epochs) only the top 1/reduction_factor go on."""

    def __post_init__(self) -> None:
        if self.name not in SCHEDULERS:
            raise ConfigError(f"scheduler.name must be one of {', '.join(SCHEDULERS)}, got '{self.name}'")
        if self.grace_period < 1:
            raise ConfigError(f"scheduler.grace_period must be >= 1, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ConfigError(f"scheduler.reduction_factor must be >= 2, got {self.reduction_factor}")


@dataclass
class SweepConfig:
    """A LoRA sweep on Ray Tune over the downstream (classifier) stage of ``jobs/finetune.py``."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Run name, storage, seed, logging and Ray connection; every trial runs with these run settings."""
    base: str = "jobs/configs/finetune/pubmedqa_rf_minilm_lora.yaml"
    """The fine-tuning config every trial starts from (stage: downstream)."""
    model_path: str | None = None
    """The base model folder (sets the base config's model.path; the demo hands pretraining's model here)."""
    data_root: str | None = None
    """Where the base config's data.path is relative to (sets its data.root)."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides of the base config, applied before each trial's sampled values."""
    space: dict[str, Any] = field(default_factory=dict)
    """The search space: a dotted key of the base config -> one of {choice: [v, ...]}, {uniform: [low, high]},
    {loguniform: [low, high]}, {randint: [low, high]} (inclusive). Keys that change the prepared data (data.*,
    model.*, train.max_length, run.*, stage, output_dir) cannot be swept."""
    search: SearchSettings = field(default_factory=SearchSettings)
    """The searcher and the trial budget."""
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    """ASHA or none."""
    serve_template: str = "cluster/serve/tiny.yaml"
    """The Serve config best/serve.yaml is made from (its first application serves the best classifier)."""
    output_dir: str | None = None
    """Where trials.csv, best/, plots/ and trials/<id>/ go; default: the run folder."""


@dataclass
class SweepOutputs:
    """What a sweep produced: the trial table and the best trial's classifier, exported."""

    run_dir: str
    output_dir: str
    best_trial: str | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_dev_auroc: float | None = None
    """The best trial's best dev macro AUROC (the metric it was selected on)."""
    test_metrics: dict[str, Any] = field(default_factory=dict)
    """The best trial's test-split metrics with CIs (never trained or selected on)."""
    best_dir: str | None = None
    """<output_dir>/best: adapter/ (the classifier folder), config.yaml, serve.yaml, metrics.json, splits.json."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """One row per trial: id, params, status, best dev AUROC, its epoch, epochs run, reason."""
    trial_epochs: int = 0
    """Epochs trained over every trial (what ASHA saves)."""

    def headline(self) -> tuple[str, Any]:
        return "best_dev_auroc", self.best_dev_auroc


def base_overrides(cfg: SweepConfig) -> list[str]:
    """The overrides every trial's config starts from: model_path and data_root, then ``overrides``."""
    out = []
    if cfg.model_path:
        out += [format_override("model.path", cfg.model_path), "model.preset=null"]
    if cfg.data_root:
        out.append(format_override("data.root", cfg.data_root))
    return [*out, *cfg.overrides]
