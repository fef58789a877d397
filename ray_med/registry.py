"""The job registry: job name -> config class, run function, default YAML, typed outputs.

``jobs/*.py`` are three lines over :func:`ray_med.cli.run_job`, which looks its job up
here; the config tests load every job's YAMLs through this table; the pipeline builds
its stages from it. Adding a job is one :class:`JobSpec` line plus a ``jobs/<name>.py``.

Config and outputs classes are imported here (they are plain dataclasses, light to
import); run functions are named by ``module:function`` and imported only when the job
runs, so ``--help`` and a config typo answer without loading torch, DeepSpeed or Ray.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray_med import runs
from ray_med.adapters.report import PeftReportConfig, PeftReportOutputs
from ray_med.config import lookup
from ray_med.corpus.config import CorpusJobConfig, CorpusOutputs
from ray_med.evaluation.config import (
    ClassifyEvalConfig,
    EvalOutputs,
    MultimodalEvalConfig,
    PerplexityEvalConfig,
    QAEvalConfig,
)
from ray_med.federated.config import FederatedConfig, FederatedEvalConfig, FederatedOutputs
from ray_med.injection.config import InjectConfig, InjectOutputs
from ray_med.pipeline.config import PipelineConfig, PipelineOutputs
from ray_med.runs import RunsConfig, RunsOutputs
from ray_med.runtime import RunContext, start_run
from ray_med.serving.config import ServeCheckConfig, ServeCheckOutputs
from ray_med.training.config import FinetuneConfig, FinetuneOutputs, PretrainConfig, PretrainOutputs
from ray_med.training.multimodal_config import MultimodalConfig, MultimodalOutputs
from ray_med.tuning.config import SweepConfig, SweepOutputs


@dataclass(frozen=True)
class JobSpec:
    """One job: what it reads, what it runs, and what it returns."""

    name: str
    config: type
    run: str
    """``module:function`` taking (config, RunContext) when ``run_folder``, else (config)."""
    outputs: type
    description: str
    default_config: str | None = None
    """Default YAML, relative to the repository root (None: the config's defaults)."""
    run_folder: bool = True
    """It owns a run folder ``<run.storage>/<prefix>-<config hash>`` with ``run.json``."""
    prefix: str | Callable[[Any], str] | None = None
    """Run-name prefix (default: the job name), or a function of the config."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Command-line flags kept as aliases of config keys (``--model`` -> ``model``)."""

    def run_prefix(self, cfg: Any) -> str:
        if callable(self.prefix):
            return self.prefix(cfg)
        return self.prefix or self.name

    def function(self) -> Callable[..., Any]:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


def _finetune_prefix(cfg: FinetuneConfig) -> str:
    return "finetune-domain" if cfg.stage == "domain" else "finetune"


_QA_FLAGS = {
    "--model": "model", "--adapter": "adapter", "--data": "data", "--format": "format", "--task": "task",
    "--mode": "qa.mode", "--shots": "qa.shots", "--shots-file": "shots_file", "--seed": "qa.seed", "--n": "qa.n",
    "--temperature": "qa.temperature", "--max-new-tokens": "qa.max_new_tokens", "--limit": "limit",
    "--batch-size": "batch_size", "--predictions": "predictions",
}
_CLASSIFY_FLAGS = {
    "--model": "model", "--adapter": "model", "--base": "base", "--task": "task", "--data": "data",
    "--format": "format", "--ids": "ids_file", "--max-length": "max_length", "--bootstrap": "bootstrap",
}
_PERPLEXITY_FLAGS = {
    "--model": "model", "--data": "data", "--format": "format", "--seq-len": "seq_len",
    "--batch-size": "batch_size", "--max-sequences": "max_sequences", "--option": "options",
}

_MULTIMODAL_FLAGS = {
    "--model": "model", "--adapter": "adapter", "--data": "data", "--format": "format", "--task": "task",
    "--split": "split", "--limit": "limit", "--bootstrap": "bootstrap", "--predictions": "predictions", "--seed": "seed",
    "--max-new-tokens": "max_new_tokens", "--batch-size": "batch_size", "--max-length": "max_length",
}

_FEDERATED_FLAGS = {
    "--model": "model", "--data": "data", "--format": "format", "--task": "task", "--modality": "modality",
    "--split": "split", "--bootstrap": "bootstrap", "--seed": "seed",
}

JOBS: dict[str, JobSpec] = {
    j.name: j
    for j in [
        JobSpec("corpus", CorpusJobConfig, "ray_med.corpus.build:run_corpus", CorpusOutputs,
                "Read the sources into Parquet, train the tokenizer, and report records, tokens and images.",
                default_config="jobs/configs/corpus/tiny.yaml"),
        JobSpec("pretrain", PretrainConfig, "ray_med.training.pretrain:run_pretrain", PretrainOutputs,
                "Continued pretraining of a causal LM on a weighted mixture of sources (Ray Train + DeepSpeed).",
                default_config="jobs/configs/pretrain/tiny.yaml"),
        JobSpec("finetune", FinetuneConfig, "ray_med.training.finetune:run_finetune", FinetuneOutputs,
                "Stage 1 (domain adapter) or stage 2 (downstream adapter + classifier head).",
                default_config="jobs/configs/finetune/pubmedqa_rf_minilm_lora.yaml", prefix=_finetune_prefix),
        JobSpec("evaluate.perplexity", PerplexityEvalConfig, "ray_med.evaluation.lm_eval:perplexity_task",
                EvalOutputs, "Perplexity of a causal LM on a corpus file.", run_folder=False,
                aliases=_PERPLEXITY_FLAGS),
        JobSpec("evaluate.classify", ClassifyEvalConfig, "ray_med.evaluation.classify_eval:classify_task",
                EvalOutputs, "Macro AUROC (with CI), AUPRC, F1 and accuracy of a saved classifier.",
                run_folder=False, aliases=_CLASSIFY_FLAGS),
        JobSpec("evaluate.qa", QAEvalConfig, "ray_med.serving.vllm:qa_task", EvalOutputs,
                "QA accuracy of a causal LM (+ LoRA adapter) in top_token, cot or sc_cot mode.",
                run_folder=False, aliases=_QA_FLAGS),
        JobSpec("multimodal", MultimodalConfig, "ray_med.training.multimodal:run_multimodal", MultimodalOutputs,
                "The multimodal model (Med-PaLM M as LLaVA): vision tower + projector + LLM on a task mixture.",
                default_config="jobs/configs/multimodal/tiny_pneumonia.yaml"),
        JobSpec("evaluate.multimodal", MultimodalEvalConfig, "ray_med.injection.evaluate:multimodal_task",
                EvalOutputs, "A multimodal or injected model on one task's file: AUROC/F1 (choice), BLEU/F1 (VQA), ROUGE-L.",
                run_folder=False, aliases=_MULTIMODAL_FLAGS),
        JobSpec("federated", FederatedConfig, "ray_med.federated.job:run_federated", FederatedOutputs,
                "Federated hospitals: clients as Ray actors, FedAvg/FedProx/FedAdam, DP, secure aggregation.",
                default_config="jobs/configs/federated/tiny_pneumonia_fedavg.yaml"),
        JobSpec("evaluate.federated", FederatedEvalConfig, "ray_med.federated.evaluate:federated_task", EvalOutputs,
                "A federated global encoder + head on a task's file: macro AUROC (with CI), F1, accuracy.",
                run_folder=False, aliases=_FEDERATED_FLAGS),
        JobSpec("inject", InjectConfig, "ray_med.injection.job:run_inject", InjectOutputs,
                "Inject the federated encoders into an LLM (FedKIM): M3OE, FedPlug or FedPlugL, seen and unseen tasks.",
                default_config="jobs/configs/inject/tiny_m3oe.yaml"),
        JobSpec("sweep", SweepConfig, "ray_med.tuning.sweep:run_sweep", SweepOutputs,
                "A LoRA sweep on Ray Tune over the downstream stage: ASHA + TPE/random/grid, resumable, best exported.",
                default_config="jobs/configs/sweep/tiny.yaml"),
        JobSpec("peft_report", PeftReportConfig, "ray_med.adapters.report:run_peft_report", PeftReportOutputs,
                "Trainable parameters and their fraction for each PEFT method and setting.",
                default_config="jobs/configs/peft_report/llama2_7b_table2.yaml", run_folder=False),
        JobSpec("serve_check", ServeCheckConfig, "ray_med.serving.deploy:run_serve_check", ServeCheckOutputs,
                "Deploy a Serve config in process, send one request to every endpoint, print the answers.",
                default_config="jobs/configs/serve_check/tiny.yaml"),
        JobSpec("pipeline", PipelineConfig, "ray_med.pipeline.run:run_pipeline", PipelineOutputs,
                "The demo pipeline: every stage, each cached by its config and its inputs.",
                default_config="jobs/configs/pipeline/tiny.yaml"),
        JobSpec("runs", RunsConfig, "ray_med.runs:run_index", RunsOutputs,
                "List the runs under run.storage: job, status, headline metric, lineage.", run_folder=False),
    ]
}


def execute(spec: JobSpec, cfg: Any, *, overrides: Sequence[str] = (), stage_key: str | None = None) -> Any:
    """Run ``spec`` on a loaded config, keeping its run record; return its typed outputs."""
    fn = spec.function()
    if not spec.run_folder:
        return fn(cfg)
    ctx: RunContext = start_run(spec.run_prefix(cfg), cfg, cfg.run)
    record = runs.begin(ctx, cfg, overrides=list(overrides), stage_key=stage_key)
    try:
        outputs = fn(cfg, ctx)
    except BaseException as exc:
        runs.end(ctx, record, error=exc)
        raise
    runs.end(ctx, record, outputs=outputs)
    return outputs


def get_job(name: str) -> JobSpec:
    """The job called ``name``, or a clear error listing the valid ones."""
    return lookup(JOBS, name, "job")


def subcommands(group: str) -> dict[str, JobSpec]:
    """The jobs ``<group>.<sub>`` by ``sub`` (``evaluate`` -> qa, classify, perplexity)."""
    return {name.split(".", 1)[1]: spec for name, spec in JOBS.items() if name.startswith(group + ".")}
