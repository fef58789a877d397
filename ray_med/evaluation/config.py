"""The configs of evaluation: how QA is asked, and one typed config per ``evaluate`` task, with their outputs.

Plain dataclasses (no torch), so ``jobs/evaluate.py --help`` and the Serve config parse
in a fraction of a second. ``jobs/evaluate.py qa|classify|perplexity`` loads one of
:class:`QAEvalConfig`, :class:`ClassifyEvalConfig` and :class:`PerplexityEvalConfig`
from YAML and ``key=value`` overrides like every job, or from the flags it has always
taken (``--model``, ``--data``, ...), which are aliases of these keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["top_token", "cot", "sc_cot"]


@dataclass
class QAConfig:
    """How questions are asked and answered."""

    mode: Mode = "top_token"
    """top_token, cot or sc_cot."""
    shots: int = 0
    """Few-shot exemplars before each question (drawn from the exemplar pool)."""
    seed: int = 0
    """Seed for exemplar choice and for sampling."""
    n: int = 5
    """Samples per question for sc_cot."""
    temperature: float = 0.8
    """Sampling temperature for sc_cot."""
    max_new_tokens: int = 128
    """Rationale length limit for cot and sc_cot."""
    max_prompt_tokens: int = 0
    """Prompt length limit; 0 means the model's context minus max_new_tokens (1 for top_token)."""


@dataclass
class PerplexityEvalConfig:
    """Perplexity of a causal LM folder on a corpus file."""

    model: str
    """HF causal-LM folder (with its tokenizer)."""
    data: str
    """The corpus file."""
    format: str
    """Its reader: pubmedqa, mtsamples, jsonl, text, parquet, ..."""
    seq_len: int = 256
    """Tokens per packed block (as pretraining packs them)."""
    batch_size: int = 8
    """Blocks per forward pass."""
    max_sequences: int | None = None
    """Score only the first N blocks."""
    options: dict[str, Any] = field(default_factory=dict)
    """Reader options (e.g. text_field for jsonl)."""


@dataclass
class ClassifyEvalConfig:
    """Macro AUROC (with a bootstrap CI), AUPRC, macro F1 and accuracy of a saved classifier."""

    model: str
    """A downstream run's folder (or its output_dir), or a classifier folder in it (<output_dir>/adapter, merged)."""
    task: str | None = None
    """The task (its label space and inputs), e.g. pubmedqa_rf; default: the one in splits.json."""
    data: str | None = None
    """The labelled file; default: the file the classifier was trained on (splits.json)."""
    split: Literal["test", "dev", "train", "all"] | None = None
    """Which records to score: a split of the splits.json the fine-tuning run wrote beside the classifier
    (test, dev, train), or all (every labelled record of data, training items included); default: test,
    or the ids of ids_file when given."""
    format: str | None = None
    """Its reader; default: the task's."""
    base: str | None = None
    """Base model folder, when not the one recorded at training."""
    ids_file: str | None = None
    """File of record ids to score, one per line, instead of a split."""
    max_length: int = 256
    """Tokens per example."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% CIs."""


@dataclass
class QAEvalConfig:
    """QA accuracy of a causal LM (optionally with a LoRA adapter) in top_token, cot or sc_cot mode."""

    model: str
    """Causal-LM folder (with its tokenizer)."""
    data: str
    """The QA file."""
    format: str
    """Its reader: medqa, medmcqa or pubmedqa."""
    adapter: str | None = None
    """A LoRA adapter folder (PEFT format) to apply."""
    task: str | None = None
    """The task (its prompt); default: the format's QA task."""
    qa: QAConfig = field(default_factory=QAConfig)
    """Mode, shots, seed, samples, temperature and lengths."""
    shots_file: str | None = None
    """Exemplar pool for qa.shots, e.g. a training split (never the evaluated file)."""
    limit: int | None = None
    """Only the first N questions."""
    batch_size: int = 8
    """Prompts per forward pass in top_token mode."""
    engine: Literal["hf", "vllm"] = "hf"
    """hf: transformers in this process; vllm: cot / sc_cot on a ray.data.llm vLLM processor (GPU workers,
    ``pip install .[vllm]``; the model and adapter readable on them)."""
    decode_batch: int = 64
    """cot / sc_cot: sequences decoded together (every sample of every item shares one decode
    loop; 1 decodes one sequence at a time, with the same answers)."""
    predictions: str | None = None
    """Per-item predictions file (JSONL); default: qa/<data>-<mode>-<shots>shot-seed<seed>.jsonl beside the
    adapter, or else the model (its run folder when a job wrote it); "" writes none."""


@dataclass
class EvalOutputs:
    """What an evaluate task returns: its metrics (the JSON object on the last stdout line)."""

    metrics: dict[str, Any] = field(default_factory=dict)

    def headline(self) -> tuple[str, Any]:
        for key in ("auroc_macro", "accuracy", "perplexity"):
            if key in self.metrics:
                return key, self.metrics[key]
        return "", None


@dataclass
class MultimodalEvalConfig:
    """A multimodal (LLaVA) model on one task's file: MultiMedBench's metric for the task's kind."""

    model: str
    """The model folder written by jobs/multimodal.py or jobs/inject.py (<output_dir>/model)."""
    data: str
    """The data file."""
    format: str
    """Its reader: medmnist, image_csv, dicom, vqa_json or report_json (an injected task: its encoder's reader)."""
    task: str
    """A multimodal task (pneumonia, vqa_rad, slake, cxr_report, pubmedqa, medqa, medmcqa), or a task of the
    injected model (seen or unseen)."""
    adapter: str | None = None
    """An injected model's adapter: jobs/inject.py's <output_dir>/adapter (M3OE or LoRA) or folded/<task>."""
    split: str | None = None
    """For a MedMNIST .npz with several splits: the one to score (a file with one split is read whole)."""
    limit: int | None = None
    """Only the first N items."""
    bootstrap: int = 1000
    """Bootstrap resamples of the 95% CIs (classification)."""
    seed: int = 0
    max_new_tokens: int = 64
    """Tokens generated per item (generation tasks)."""
    max_length: int = 512
    """Tokens per prompt (its text context is cut past it)."""
    batch_size: int = 16
    predictions: str | None = None
    """Per-item predictions file (JSONL); default: eval/<task>-<data file stem>[-<split>].jsonl beside the model."""
