"""The config of ``jobs/inject.py``: where the federated encoders come from, the LLM, the method, the tasks, training.

A task of the injection stage is a question about one modality's inputs, with its own
description text (what M3OE's gate reads) and answer words: ``answers`` maps each label
of the modality's data to the word the model should say. The data is the federated
run's: ``global/<modality>/config.json`` names its file and the seed and ratios of its
7:1:1:1 split, so the injection trains on exactly the public split the federation left
to the server, selects on its dev split and reports on its test split.

``unseen`` tasks are never trained on: they are scored zero-shot on the test split, and
their description text must differ from every trained task's (checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_med.adapters.config import AdapterConfig
from ray_med.errors import ConfigError
from ray_med.models.config import TokenizerConfig
from ray_med.runtime import RuntimeConfig
from ray_med.training.config import CheckpointSettings, ScalingSettings

METHODS = ("m3oe", "fedplug", "fedplugl")
MODALITY_TEXTS = {"image": "Image only", "tabular": "Table only", "text": "Text only", "signal": "Signal only"}
"""The modality descriptions the gate reads (FedKIM's wording: "Image only", ...)."""


@dataclass
class InjectTask:
    """One question about one modality's inputs."""

    name: str = "pneumonia"
    """The task's name (its metrics, predictions and gate statistics are keyed by it)."""
    modality: str = "image"
    """Whose federated encoder reads the inputs: image, tabular, text or signal."""
    description: str = "Pneumonia detection from a chest X-ray"
    """The task text M3OE's gate reads (also written in every method's prompt)."""
    question: str = "Does this chest X-ray show pneumonia?"
    answers: dict[str, str] = field(default_factory=lambda: {"pneumonia": "yes", "normal": "no"})
    """Label of the modality's data -> the answer word (several labels may share a word)."""


@dataclass
class FederatedSource:
    """The federated encoders: a finished run's ``global/`` folder, or a federated config run round by round."""

    global_dir: str | None = None
    """A federated run's <output_dir>/global (injection after federated training)."""
    config: str | None = None
    """With rounds_interleaved: the federated job's YAML, run one round at a time under <output_dir>/federated."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides of that federated config."""


@dataclass
class LLMSettings:
    """The language model the encoders are injected into."""

    preset: str | None = "tiny-llama"
    """A causal-LM preset, random init (its BPE tokenizer is trained on the seen tasks' prompts)."""
    path: str | None = None
    """A causal-LM folder with its tokenizer (e.g. the pretraining job's model); wins over preset."""
    dtype: str = "float32"


@dataclass
class InjectTrainSettings:
    batch_size: int = 16
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    patience: int | None = 3
    """Stop after this many dev evaluations without a better mean dev AUROC (null: never)."""
    log_every: int = 10
    dev_max_items: int = 256
    """Score at most this many dev items per task (a seeded sample)."""


@dataclass
class InjectConfig:
    """FedKIM's server side: the federated encoders projected into an LLM, trained with M3OE, FedPlug or FedPlugL."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    federated: FederatedSource = field(default_factory=FederatedSource)
    method: str = "m3oe"
    """m3oe: projectors + M3OE experts; fedplug: projectors only (LLM frozen); fedplugl: projectors + a plain
    LoRA with M3OE's trainable-parameter budget."""
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(method="m3oe", r=8, alpha=32, experts=4))
    """M3OE: experts, r, alpha, target_modules, top_k, gate_inputs (both | task_only | modality_only),
    load_balance. FedPlugL takes target_modules and alpha / r from here and sizes its rank to the budget."""
    llm: LLMSettings = field(default_factory=LLMSettings)
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(vocab_size=1024, min_frequency=1))
    tokens_per_modality: int = 4
    """LLM tokens each encoder vector is projected to."""
    modality_texts: dict[str, str] = field(default_factory=lambda: dict(MODALITY_TEXTS))
    tasks: list[InjectTask] = field(default_factory=lambda: [InjectTask()])
    """The seen tasks: trained on the public split, selected on dev, reported on test."""
    unseen: list[InjectTask] = field(default_factory=list)
    """Never trained on: scored zero-shot on the test split."""
    baselines: list[str] = field(default_factory=list)
    """Other methods to run after ``method`` on the same data and budget (e.g. [fedplug, fedplugl]), each into
    <output_dir>/baselines/<method>; the job then prints every method's test AUROC side by side."""
    rounds_interleaved: bool = False
    """FedKIM's loop: each federated round is followed by one injection epoch (needs federated.config)."""
    train: InjectTrainSettings = field(default_factory=InjectTrainSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    bootstrap: int = 1000
    """Bootstrap resamples of the test metrics' 95% CIs."""
    output_dir: str | None = None
    """Where model/, adapter/, folded/, metrics.json and gate_stats.json go (default: the run folder)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "m3oe" and self.adapter.method != "m3oe":
            raise ConfigError(f"method m3oe trains adapter.method m3oe, got adapter.method {self.adapter.method!r}")
        if not self.tasks:
            raise ConfigError("tasks: give at least one seen task")
        names = [t.name for t in [*self.tasks, *self.unseen]]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique across tasks and unseen, got {names}")
        seen_texts = {t.description.strip().lower() for t in self.tasks}
        for t in [*self.tasks, *self.unseen]:
            if t.modality not in self.modality_texts:
                raise ConfigError(f"task {t.name}: unknown modality {t.modality!r}; choose from "
                                  f"{', '.join(self.modality_texts)}")
            if not t.answers or len(set(t.answers.values())) < 2:
                raise ConfigError(f"task {t.name}: answers must map the labels to at least two answer words")
        for t in self.unseen:
            if t.description.strip().lower() in seen_texts:
                raise ConfigError(f"unseen task {t.name}: its description {t.description!r} is a trained task's; "
                                  "an unseen task's text must never appear in training")
        for b in self.baselines:
            if b not in METHODS or b == self.method:
                raise ConfigError(f"baselines: {b!r} must be a method other than {self.method} "
                                  f"({', '.join(METHODS)})")
        if self.baselines and self.rounds_interleaved:
            raise ConfigError("baselines run after federated training; with rounds_interleaved run each method "
                              "as its own job")
        if self.rounds_interleaved and not self.federated.config:
            raise ConfigError("rounds_interleaved needs federated.config (the federated job's YAML)")
        if self.tokens_per_modality < 1:
            raise ConfigError("tokens_per_modality must be >= 1")


@dataclass
class InjectOutputs:
    """What the injection job produced."""

    run_dir: str
    model_dir: str
    """The injected model: llm/, encoders/<modality>/, projectors.safetensors, injected_config.json."""
    adapter_dir: str | None
    """The M3OE or LoRA adapter (None for fedplug, which trains projectors only)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """test: {task: metrics}, seen / unseen task lists, parameters, gate statistics."""

    def headline(self) -> tuple[str, Any]:
        seen = [m["auroc_macro"] for t, m in self.metrics.get("test", {}).items()
                if t in self.metrics.get("seen", []) and m.get("auroc_macro") is not None]
        return "seen_auroc", (sum(seen) / len(seen)) if seen else None
