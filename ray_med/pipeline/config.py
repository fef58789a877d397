"""The pipeline's config and outputs (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_med.data.config import CorpusConfig
from ray_med.models.config import TokenizerConfig
from ray_med.runtime import RuntimeConfig


@dataclass
class StageConfig:
    """A stage of the pipeline, run from its own job config."""

    enabled: bool = True
    """Run this stage."""
    config: str = ""
    """The stage's job config file (YAML)."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides applied to that config (after the hand-off from the stages before it)."""


@dataclass
class PipelineConfig:
    """The demo pipeline: data, pretraining, the two adapter stages and serving, each cached."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Run name, storage, seed, logging and Ray connection (every stage runs on these)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The data stage's sources; corpus.root is also where every later stage reads its data."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer the data stage trains and pretraining uses."""
    seq_len: int = 256
    """Sequence length that the data report counts packed sequences for."""
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(config="jobs/configs/pretrain/tiny.yaml"))
    """Continued pretraining of the tiny preset (with the data stage's tokenizer)."""
    domain: StageConfig = field(default_factory=lambda: StageConfig(config="jobs/configs/finetune/tiny_domain.yaml"))
    """Stage-1 domain adapter on the pretrained model (needs pretrain)."""
    downstream: StageConfig = field(
        default_factory=lambda: StageConfig(config="jobs/configs/finetune/tiny_downstream.yaml")
    )
    """Stage-2 downstream adapter + classifier (needs pretrain; stacks domain's adapter when it ran)."""
    sweep: StageConfig = field(default_factory=lambda: StageConfig(config="jobs/configs/sweep/tiny.yaml"))
    """A short LoRA sweep (Ray Tune, ASHA) of the PubMedQA classifier on the pretrained model (needs pretrain)."""
    serve: StageConfig = field(default_factory=lambda: StageConfig(config="jobs/configs/serve_check/tiny.yaml"))
    """Deploy the results with Ray Serve (the sweep's best classifier too) and ask every endpoint once (needs
    pretrain)."""
    multimodal: StageConfig = field(
        default_factory=lambda: StageConfig(config="jobs/configs/multimodal/tiny_pneumonia.yaml")
    )
    """The multimodal model: the pretrained LM (when pretrain ran) under a vision tower, on PneumoniaMNIST +
    PubMedQA; held-out macro AUROC with its CI."""
    serve_vlm: StageConfig = field(default_factory=lambda: StageConfig(config="jobs/configs/serve_check/tiny_vlm.yaml"))
    """Serve the multimodal model and send it a real chest X-ray (needs multimodal)."""
    federated: StageConfig = field(
        default_factory=lambda: StageConfig(config="jobs/configs/federated/tiny_multimodal.yaml",
                                            overrides=["rounds=5"])
    )
    """Federated hospitals: 5 sites holding different modalities, one encoder per modality with FedAvg on a pool
    of Ray actors; per-round table."""
    inject: StageConfig = field(
        default_factory=lambda: StageConfig(config="jobs/configs/inject/tiny_m3oe.yaml",
                                            overrides=["baselines=[fedplug, fedplugl]"])
    )
    """The federated encoders injected into an LLM with M3OE, then FedPlug and FedPlugL (needs federated)."""


@dataclass
class PipelineOutputs:
    """Every stage's run: its job, folder, cache key, whether it was cached, and its outputs."""

    run_dir: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def headline(self) -> tuple[str, Any]:
        return "stages_run", sum(not s["cached"] for s in self.stages.values())
