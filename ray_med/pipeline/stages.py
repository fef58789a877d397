"""The pipeline's stages: which registered job each runs, what it needs, and how it takes the outputs before it.

A hand-off turns the typed outputs of earlier stages into ``key=value`` overrides of the
stage's own job config: the same overrides a user would type to run that job alone
(``model.path=runs/pretrain-1a2b3c4d/model``), recorded in the stage's ``run.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray_med.config import format_override
from ray_med.pipeline import show
from ray_med.pipeline.config import PipelineConfig

HandOff = Callable[[PipelineConfig, dict[str, Any]], list[str]]


@dataclass(frozen=True)
class Stage:
    name: str
    """The pipeline config section and the name in summary.json."""
    job: str
    """The registered job it runs."""
    description: str
    needs: tuple[str, ...] = ()
    """Stages that must have run before it (it is skipped, with a reason, when one is off)."""
    uses: tuple[str, ...] = ()
    """Stages whose outputs it reads when they ran (its needs among them): their keys are part of its key."""
    handoff: HandOff = lambda cfg, up: []
    show: Callable[[Any, bool], None] = lambda out, cached: None
    artifacts: Callable[[Any], list[str]] = lambda out: []
    """The folders its outputs name that later stages read: a finished run is reused only
    while every one is complete (``runtime.is_complete``), so a half-written one is redone."""


def _data_root(cfg: PipelineConfig) -> str:
    return cfg.corpus.root


def _pretrain(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    return [format_override("corpus.root", _data_root(cfg)),
            format_override("tokenizer.path", up["data"].tokenizer_dir)]


def _domain(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    return [format_override("model.path", up["pretrain"].model_dir), "model.preset=null",
            format_override("corpus.root", _data_root(cfg))]


def _downstream(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    domain = up.get("domain")
    return [format_override("model.path", up["pretrain"].model_dir), "model.preset=null",
            format_override("domain_adapter", domain.adapter_dir if domain else None),
            format_override("data.root", _data_root(cfg))]


def _sweep(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    return [format_override("model_path", up["pretrain"].model_dir), format_override("data_root", _data_root(cfg))]


def _serve(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    domain, downstream, sweep = up.get("domain"), up.get("downstream"), up.get("sweep")
    pubmedqa = next((s for s in cfg.corpus.sources if s.reader == "pubmedqa"), None)
    classifiers = {"pubmedqa_rf": downstream.adapter_dir} if downstream else {}
    if sweep is not None:  # the sweep's best classifier, exported in the classifier format, served beside it
        classifiers["pubmedqa_rf_sweep"] = f"{sweep.best_dir}/adapter"
    out = [
        format_override("args.model", up["pretrain"].model_dir),
        "args.adapters=" + json.dumps({"mtsamples": domain.adapter_dir} if domain else {}),
        "args.classifiers=" + json.dumps(classifiers),
        format_override("data_root", _data_root(cfg)),
    ]
    if pubmedqa is not None:
        out.append(format_override("data_path", pubmedqa.path))
    return out


def _multimodal(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    out = [format_override("data_root", _data_root(cfg))]
    if "pretrain" in up:  # the life of one model: the pretrained LM learns to see
        out += [format_override("model.language_model", up["pretrain"].model_dir), "model.preset=null"]
    return out


def _serve_vlm(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    return [format_override("args.model", up["multimodal"].model_dir), format_override("data_root", _data_root(cfg))]


def _federated(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    return [format_override("data_root", _data_root(cfg))]


def _inject(cfg: PipelineConfig, up: dict[str, Any]) -> list[str]:
    return [format_override("federated.global_dir", up["federated"].global_dir)]


STAGES: tuple[Stage, ...] = (
    Stage("data", "corpus", "read the corpus sources into Parquet, train the tokenizer (on the documents "
          "pretraining trains on), print the data report", show=show.show_data,
          artifacts=lambda out: [out.tokenizer_dir]),
    Stage("pretrain", "pretrain", "continued pretraining of the tiny Llama with that tokenizer on Ray Train + "
          "DeepSpeed; held-out perplexity per source before and after", needs=("data",), uses=("data",), handoff=_pretrain,
          show=show.show_pretrain, artifacts=lambda out: [out.model_dir]),
    Stage("domain", "finetune", "stage-1 domain LoRA on the MTSamples notes over the pretrained model; its "
          "held-out perplexity", needs=("pretrain",), uses=("pretrain",), handoff=_domain, show=show.show_domain,
          artifacts=lambda out: [out.adapter_dir]),
    Stage("downstream", "finetune", "stage-2 downstream LoRA + classifier head on PubMedQA (reasoning-free), the "
          "domain adapter stacked under it; test-split metrics with bootstrap CIs", needs=("pretrain",),
          uses=("pretrain", "domain"), handoff=_downstream, show=show.show_downstream,
          artifacts=lambda out: [out.adapter_dir]),
    Stage("sweep", "sweep", "a short LoRA sweep of the PubMedQA classifier on Ray Tune over Ray Train (ASHA "
          "stops weak trials); the trial table and the best trial, exported ready to serve", needs=("pretrain",),
          uses=("pretrain",), handoff=_sweep, show=show.show_sweep, artifacts=lambda out: [f"{out.best_dir}/adapter"]),
    Stage("serve", "serve_check", "the Serve app on the pretrained model, the domain adapter and the classifiers "
          "(the sweep's best too); one request to every endpoint", needs=("pretrain",),
          uses=("pretrain", "domain", "downstream", "sweep"), handoff=_serve, show=show.show_serve),
    Stage("multimodal", "multimodal", "the multimodal model (Med-PaLM M as LLaVA): the pretrained LM under a tiny "
          "vision tower, trained on PneumoniaMNIST + PubMedQA; held-out macro AUROC with its CI",
          uses=("pretrain",), handoff=_multimodal, show=show.show_multimodal,
          artifacts=lambda out: [out.model_dir]),
    Stage("serve_vlm", "serve_check", "the Serve app on the multimodal model: a real chest X-ray to /v1/generate, "
          "chat and /v1/classify", needs=("multimodal",), uses=("multimodal",), handoff=_serve_vlm,
          show=show.show_serve),
    Stage("federated", "federated", "federated hospitals: 5 sites holding different modalities (chest X-rays, the "
          "breast-cancer table, MTSamples notes, heartbeats) train one encoder per modality with FedAvg on a pool "
          "of Ray actors; one line per round, test AUROC with its CI", handoff=_federated,
          show=show.show_federated, artifacts=lambda out: [f"{out.global_dir}/{mod}" for mod in out.test]),
    Stage("inject", "inject", "the federated encoders injected into a tiny Llama (FedKIM): M3OE, FedPlug and "
          "FedPlugL at the same budget on the public split; seen and unseen tasks' test AUROC side by side, and "
          "the gate's expert usage per task", needs=("federated",), uses=("federated",), handoff=_inject,
          show=show.show_inject, artifacts=lambda out: [out.model_dir]),
)


def describe_stages() -> str:
    """The stages for ``jobs/pipeline.py --help``."""
    lines = ["Stages, in order (each is skipped as `cached` when an earlier run finished it with the same "
             "config and inputs; <stage>.enabled=false turns one off, <stage>.overrides=[...] changes it):", ""]
    for i, s in enumerate(STAGES, 1):
        lines.append(f"  {i}. {s.name} ({s.job} job): {s.description}")
    return "\n".join(lines)
