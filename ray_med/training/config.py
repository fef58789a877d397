"""The training jobs' config trees and their typed outputs (plain dataclasses, no torch).

:class:`PretrainConfig` (Meditron's recipe as defaults) and :class:`FinetuneConfig`
(Clinical LLaMA-LoRA's two stages) are what ``jobs/pretrain.py`` and ``jobs/finetune.py``
load; :class:`PretrainOutputs` and :class:`FinetuneOutputs` are what they return, and
what the pipeline hands to the next stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ray_med.adapters.config import AdapterConfig
from ray_med.data.config import CorpusConfig
from ray_med.errors import ConfigError
from ray_med.models.config import ModelConfig, TokenizerConfig
from ray_med.runtime import RuntimeConfig

FUSED_LOSSES = ("auto", "chunked", "liger")
"""The named kinds of ``train.fused_loss`` (besides true, which is auto, and false)."""


@dataclass
class OptimConfig:
    """AdamW and the cosine schedule; defaults are Meditron's (7B: lr 3e-4, 70B: 1.5e-4)."""

    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-5
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    grad_clip: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    warmup_steps: int = 10
    """Linear warmup, in optimizer steps (not a ratio)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak."""


@dataclass
class DeepSpeedSettings:
    """DeepSpeed ZeRO settings."""

    zero_stage: int = 2
    """ZeRO stage 0-3: 1 shards optimizer state, 2 also gradients, 3 also weights."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep weights in CPU memory (ZeRO-3 only)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs zero_stage 1-3")


@dataclass
class ScalingSettings:
    """Ray Train workers and their resources."""

    num_workers: int = 1
    """Data-parallel workers (one per GPU on a GPU cluster); 0 runs the worker function in this
    process (Ray Train's local mode: quick to start, no restarts and no checkpoints kept)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: int | None = None
    """CPUs (and torch threads) per worker; default: the cluster's CPUs / workers on CPU, 4 on GPU."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra custom resources per worker (e.g. {accelerator_type:H100: 0.001})."""
    max_failures: int = 3
    """Worker failures to recover from, each time from the last checkpoint."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"scaling.num_workers must be >= 0 (0: in this process), got {self.num_workers}")


@dataclass
class TrainSettings:
    """Batch shape, length and logging."""

    seq_len: int = 256
    """Packed sequence length in tokens."""
    micro_batch_size: int = 8
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 100
    """Optimizer steps to train for."""
    log_every: int = 1
    """Print a progress line every this many steps (rank 0)."""
    report_every: int = 10
    """Report metrics to Ray Train every this many steps (a barrier across workers)."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU (H100 bf16 dense: 989e12); 0 disables MFU."""
    activation_checkpointing: bool = False
    """Keep only each decoder layer's input and recompute the rest in the backward (HF gradient
    checkpointing, non-reentrant): about a third more compute for a fraction of the activation memory."""
    compile: bool = False
    """torch.compile each decoder layer in place (the DeepSpeed engine still wraps the model); worth it
    on a GPU, where the first steps pay a compile of one layer. Off by default: on CPU it costs more than it saves."""
    fused_loss: bool | str = False
    """The LM loss without the fp32 logits of the whole batch: true or auto (Liger's fused kernel on a GPU
    with the gpu extra, else chunked), chunked (plain torch, token chunks), liger (GPU only); false: HF's loss."""
    fail_at_step: int | None = None
    """Test only: rank 1 (or 0 with one worker) exits once at this step to exercise recovery."""
    fail_mode: str = "exit"
    """Test only: what rank 1 does at fail_at_step: exit (its process dies) or hold (it writes
    its node's ID to a marker file and waits there for the test to remove that node)."""

    def __post_init__(self) -> None:
        if self.fail_mode not in ("exit", "hold"):
            raise ConfigError(f"train.fail_mode must be exit or hold, got {self.fail_mode!r}")
        if isinstance(self.fused_loss, str) and self.fused_loss not in FUSED_LOSSES:
            raise ConfigError(f"train.fused_loss must be true, false or one of {', '.join(FUSED_LOSSES)}, "
                              f"got {self.fused_loss!r}")


@dataclass
class CheckpointSettings:
    """DeepSpeed checkpoints stored as Ray Train checkpoints."""

    every_steps: int = 50
    """Checkpoint every this many steps (and at the end)."""
    keep: int = 2
    """Checkpoints to keep (the oldest are deleted)."""
    async_upload: bool = False
    """Copy each checkpoint to the run's storage in the background (Ray Train's ASYNC upload): training
    waits only for the local write. Off by default: a worker that dies during an upload resumes one checkpoint
    further back."""


@dataclass
class EvalSettings:
    """Held-out evaluation per source."""

    every_steps: int = 50
    """Evaluate every this many steps (and before the first and after the last)."""
    heldout_fraction: float = 0.05
    """Fraction of each source's documents held out from training."""
    max_sequences: int = 64
    """Most held-out sequences evaluated per source."""


@dataclass
class PretrainConfig:
    """Continued pretraining of a causal LM on a weighted mixture of sources."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Run name, storage, seed, logging and Ray connection."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: a preset (random init) or a checkpoint folder."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer training for presets (a checkpoint brings its own tokenizer)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The sources and their mixture weights."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Sequence length, batch, steps, logging."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    """ZeRO stage, precision and offload."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    """Workers and resources."""
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    """Checkpoint interval and retention."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    """Held-out evaluation."""
    output_dir: str | None = None
    """Where the final model goes (<output_dir>/model); default: the run folder."""


@dataclass
class PretrainOutputs:
    """What a pretraining run produced."""

    run_dir: str
    model_dir: str
    """The HF model folder (with its tokenizer)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last reported metrics."""
    checkpoint: str | None = None
    """The latest checkpoint."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every logged step and evaluation, as in metrics.json."""

    def headline(self) -> tuple[str, Any]:
        evals = [r for r in self.history if any(k.endswith("/perplexity") for k in r)]
        if evals:
            ppl = [v for k, v in evals[-1].items() if k.endswith("/perplexity")]
            return "heldout_perplexity_mean", sum(ppl) / len(ppl)
        return "loss", self.metrics.get("loss")


@dataclass
class ClassifyTrainConfig:
    """Optimisation of a stage-2 classifier."""

    epochs: int = 4
    """Passes over the training split."""
    batch_size: int = 16
    """Examples per step (per worker)."""
    lr: float = 5e-4
    """Peak learning rate (adapters and head; full fine-tuning wants ~5e-5)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warmup, in optimizer steps."""
    loss: Literal["weighted_ce", "ce", "bce"] = "weighted_ce"
    """weighted_ce (N/(K n_k) class weights), ce, or bce (multi-label)."""
    patience: int = 2
    """Stop after this many epochs without a better dev macro AUROC (the dev split, never the test split)."""
    max_length: int = 256
    """Tokens per example (question + context are truncated to fit)."""
    grad_clip: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    log_every: int = 0
    """Log a step line every N steps (0: one line per epoch)."""
    compile: bool = False
    """torch.compile each encoder/decoder layer of the base in place (worth it on a GPU; off on CPU)."""
    fail_at_step: int | None = None
    """Test only: rank 1 (or 0 with one worker) exits once at this step to exercise recovery."""


@dataclass
class TaskDataConfig:
    """The labelled data of the downstream stage."""

    task: str = "pubmedqa_rf"
    """A classification task of the task registry (pubmedqa, pubmedqa_rf, mtsamples_specialty, mimic_*)."""
    root: str = "../shared/data"
    """Folder that a relative data.path is resolved against (from the working directory)."""
    path: str = "pubmedqa/pqal_trainval.json"
    """The data file: relative to data.root, absolute, or pkg://package/path."""
    reader: str | None = None
    """Reader format; default: the task's own."""
    dev_size: int | float = 0.1
    """Dev split (stratified): early stopping and the best epoch. A count >= 1, or a fraction in (0, 1) of the data."""
    test_size: int | float = 0.2
    """Test split (stratified), never trained on or selected on: the reported metrics and CIs. A count >= 1, or a
    fraction in (0, 1) of the data."""
    split_seed: int | None = None
    """Seed of the train/dev/test split; default: run.seed."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed records: raise, or count and skip."""

    def __post_init__(self) -> None:
        for key in ("dev_size", "test_size"):
            size = getattr(self, key)
            if (isinstance(size, float) and not 0.0 < size < 1.0) or (isinstance(size, int) and size < 1):
                raise ConfigError(f"data.{key} must be a count >= 1 or a fraction in (0, 1), got {size}")
        fractions = [getattr(self, k) for k in ("dev_size", "test_size") if isinstance(getattr(self, k), float)]
        if len(fractions) == 2 and sum(fractions) >= 1:
            raise ConfigError(f"data.dev_size + data.test_size = {self.dev_size + self.test_size:g} leave no "
                              "training data; make them smaller")


@dataclass
class FinetuneConfig:
    """Stage 1 (domain adapter) or stage 2 (downstream adapter + classifier head)."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Run name, storage, seed, logging and Ray connection."""
    stage: Literal["domain", "downstream"] = "downstream"
    """domain: a causal-LM adapter on clinical text; downstream: a classifier on a task."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model: a folder (the pretraining stage's model, MiniLM, Llama-2) or a preset."""
    setting: Literal["head_only", "adapter", "full"] = "adapter"
    """downstream: train the head only, adapters + head, or everything."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The adapter this stage trains (domain: any method; downstream: lora or adaption_prompt)."""
    domain_adapter: str | None = None
    """downstream: a stage-1 adapter folder stacked under the new adapter."""
    domain_trainable: bool = False
    """downstream: keep training the stage-1 adapter (the paper's best) or freeze it."""
    pooling: Literal["mean", "last", "cls"] = "mean"
    """downstream: mean for encoders, last for decoders."""
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    """downstream: the task and its data."""
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)
    """downstream: optimisation."""
    bootstrap: int = 1000
    """downstream: bootstrap resamples for the metrics' 95% CIs."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """domain: the clinical text."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """domain with a preset base: tokenizer training."""
    lm: TrainSettings = field(default_factory=lambda: TrainSettings(max_steps=100, log_every=10, report_every=50))
    """domain: sequence length, batch and steps."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0))
    """domain: optimizer and schedule."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    """domain: held-out perplexity."""
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    """Checkpoint interval (domain, in steps; downstream checkpoints every epoch) and retention."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    """Workers and resources."""
    output_dir: str | None = None
    """Where the adapter goes (<output_dir>/adapter); default: the run folder."""
    merge: bool = False
    """downstream: also write <output_dir>/merged, the base with both LoRA adapters merged in, plus the head."""


@dataclass
class FinetuneOutputs:
    """What a fine-tuning stage produced: an adapter (domain) or a classifier folder (downstream)."""

    run_dir: str
    stage: str
    adapter_dir: str
    """domain: the PEFT adapter folder; downstream: the classifier folder (adapter + head)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """domain: the last reported metrics; downstream: the test split's metrics with CIs."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every logged step / epoch and evaluation."""

    def headline(self) -> tuple[str, Any]:
        if self.stage == "downstream":
            return "test_auroc_macro", self.metrics.get("auroc_macro")
        evals = [r for r in self.history if any(k.endswith("/perplexity") for k in r)]
        if evals:
            ppl = [v for k, v in evals[-1].items() if k.endswith("/perplexity")]
            return "heldout_perplexity_mean", sum(ppl) / len(ppl)
        return "loss", self.metrics.get("loss")
