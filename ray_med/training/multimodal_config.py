"""The config of ``jobs/multimodal.py``: the model and phase, the task mixture, training and the held-out scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_med.errors import ConfigError
from ray_med.models.config import TokenizerConfig
from ray_med.models.vlm import VLMConfig
from ray_med.runtime import RuntimeConfig
from ray_med.training.config import CheckpointSettings, ScalingSettings


@dataclass
class TaskSource:
    """One task of the mixture: a registered multimodal task and the file it reads."""

    task: str = "pneumonia"
    """A multimodal task (see ray_med.tasks.multimodal_tasks())."""
    path: str = "pneumoniamnist/pneumoniamnist_trainval.npz"
    """Its data file, relative to data_root unless absolute."""
    reader: str | None = None
    """Reader format (default: the task's)."""
    options: dict[str, Any] | None = None
    """Reader options; null: {splits: [train]} for a reader with splits (MedMNIST), else none."""
    limit: int | None = None
    """Use at most this many items (a seeded sample)."""
    ratio: float | None = None
    """Share of the mixture's samples; null for every task: proportional to size (times upsample)."""
    upsample: float = 1.0
    """With proportional ratios: multiply this task's size by this factor."""


@dataclass
class EvalSource:
    """A held-out file scored once after training (never trained or selected on)."""

    task: str = "pneumonia"
    path: str = "pneumoniamnist/pneumoniamnist_trainval.npz"
    reader: str | None = None
    options: dict[str, Any] | None = None
    """Reader options; null: {splits: [val]} for a reader with splits (MedMNIST), else none."""
    limit: int | None = None
    max_new_tokens: int = 128
    """Tokens generated per item (generation tasks: VQA, reports)."""


@dataclass
class MixtureConfig:
    """How batches mix the tasks (Med-PaLM M: proportional to size, every task in every batch)."""

    min_per_task_per_batch: int = 1
    """Samples of every task in every batch (0: none forced)."""


@dataclass
class MultimodalTrainSettings:
    """Steps, batches and the optimizer of the multimodal job."""

    batch_size: int = 16
    """Samples per optimizer step on each worker."""
    epochs: int = 3
    """Passes over the mixture (its natural size: the sum of the tasks' sizes)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps instead (wins over epochs)."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    max_length: int = 256
    """Tokens per example (prompt with its image tokens, and target)."""
    dev_fraction: float = 0.1
    """Share of each task's training items held out as dev (early stopping and best-weights selection)."""
    dev_max_items: int = 256
    """Score at most this many dev items per task."""
    eval_every: int = 0
    """Evaluate dev every N steps (0: at every epoch end)."""
    monitor: str | None = None
    """Dev metric that early stopping and the kept weights follow, higher is better (dev_<task>_auroc,
    dev_auroc, neg_dev_loss); null: dev_auroc (the mean over choice tasks) if any, else neg_dev_loss."""
    patience: int | None = 3
    """Stop after this many evaluations without a better monitored metric (null: never)."""
    keep_best: bool = True
    """End with the weights of the best evaluation (a copy of the trainable weights is kept in memory)."""
    log_every: int = 10
    fail_at_step: int | None = None
    """Test only: kill a worker at this step once, to show a resume."""


@dataclass
class MultimodalConfig:
    """The multimodal (Med-PaLM M-style) model trained on a task mixture with Ray Train."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Run name, storage, seed, logging and Ray connection."""
    model: VLMConfig = field(default_factory=VLMConfig)
    """Which model (a vlm preset, a LLaVA folder, or a causal LM + vision tower) and which phase."""
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(vocab_size=2048))
    """The BPE tokenizer trained on the tasks' prompts for a preset (folders bring their own)."""
    data_root: str = "../shared/data"
    """Folder a relative task path is resolved against."""
    tasks: list[TaskSource] = field(default_factory=lambda: [TaskSource()])
    """The task mixture."""
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    eval: list[EvalSource] = field(default_factory=list)
    """Held-out files scored once after training (e.g. PneumoniaMNIST's val split), with bootstrap CIs."""
    bootstrap: int = 1000
    """Bootstrap resamples of the held-out metrics' 95% CIs."""
    train: MultimodalTrainSettings = field(default_factory=MultimodalTrainSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    output_dir: str | None = None
    """Where model/, metrics.json and predictions go (default: the run folder)."""

    def __post_init__(self) -> None:
        from ray_med.tasks.registry import get_multimodal_task  # lazy: the registry imports the task modules

        if not self.tasks:
            raise ConfigError("tasks: give at least one task")
        names = [t.task for t in self.tasks]
        for t in [*self.tasks, *self.eval]:
            get_multimodal_task(t.task)
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: each task once (got {names}); use upsample or ratio to weight one")
        ratios = [t.ratio for t in self.tasks]
        if any(r is not None for r in ratios) and any(r is None for r in ratios):
            raise ConfigError("tasks: give a ratio to every task or to none (none: proportional to size)")
        if any(r is not None for r in ratios) and any(t.upsample != 1.0 for t in self.tasks):
            raise ConfigError("tasks: upsample applies to proportional ratios; with explicit ratios set the ratio")
        for t in self.tasks:
            if (t.ratio is not None and not t.ratio >= 0) or not t.upsample > 0:
                raise ConfigError(f"tasks: {t.task} needs ratio >= 0 and upsample > 0 (got {t.ratio}, {t.upsample})")
        evals = [e.task for e in self.eval]
        if len(set(evals)) != len(evals):
            raise ConfigError(f"eval: each task once (got {evals}); its predictions file is named after the task")
        for e in self.eval:
            for t in self.tasks:
                eo, to = source_options(e, "val"), source_options(t, "train")
                if e.path == t.path and _splits_overlap(to, eo):
                    raise ConfigError(f"eval: {e.task} scores {e.path} {_splits(eo)}, which tasks trains on "
                                      f"({_splits(to)}): held-out numbers must come from items never trained "
                                      "on; give each its own split (options: {splits: [...]})")
        if not 0.0 < self.train.dev_fraction < 1.0:
            raise ConfigError(f"train.dev_fraction must be in (0, 1), got {self.train.dev_fraction}")


def source_options(src: TaskSource | EvalSource, default_split: str) -> dict[str, Any]:
    """A source's reader options, with its default split filled in for readers that have splits."""
    if src.options is not None:
        return dict(src.options)
    # lazy: the readers (numpy, pyarrow) load when a multimodal config is checked, not for every job's
    from ray_med.data.readers import reader_options
    from ray_med.tasks.registry import get_multimodal_task  # lazy: as above

    reader = src.reader or get_multimodal_task(src.task).reader
    return {"splits": [default_split]} if "splits" in reader_options(reader) else {}


def _splits(options: dict[str, Any]) -> str:
    return f"splits {list(options['splits'])}" if options.get("splits") else "(every split)"


def _splits_overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    sa, sb = a.get("splits"), b.get("splits")
    if not sa or not sb:  # a reader without splits, or every split of the file
        return True
    return bool(set([sa] if isinstance(sa, str) else sa) & set([sb] if isinstance(sb, str) else sb))


@dataclass
class MultimodalOutputs:
    """What the multimodal job produced."""

    run_dir: str
    model_dir: str
    """The HF folder (LLaVA) with tokenizer and processor."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Held-out metrics by task (the eval sources), best dev metric, steps, timings."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def headline(self) -> tuple[str, Any]:
        for task, m in (self.metrics.get("eval") or {}).items():
            if "auroc_macro" in m:
                return f"{task}_auroc", m["auroc_macro"]
        return "best_dev", self.metrics.get("best_dev")


