"""Trainable-parameter report for PEFT methods on any preset, built on the meta device.

No weights are allocated, so the Llama-2-7B and 70B shapes report in seconds on a laptop.
This is how Table 2 of Clinical LLaMA-LoRA (trainable parameters per method) is checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.registry import peft_config
from ray_med.models.config import ModelConfig
from ray_med.models.presets import count_parameters, preset_config


@dataclass
class ReportEntry:
    """One row of the report: a named adapter setting."""

    name: str
    """Row label."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The adapter setting."""
    expected: int | None = None
    """The count the paper reports, when known (checked, not assumed)."""


@dataclass
class PeftReportConfig:
    """Which model and which adapter settings to count."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="llama2-7b"))
    """The base model (a preset, or a folder whose config is read; no weights are loaded)."""
    entries: list[ReportEntry] = field(default_factory=list)
    """The settings to count."""


def peft_report(cfg: PeftReportConfig) -> dict[str, Any]:
    """Trainable parameters and their fraction for each entry."""
    # lazy: this module holds the job's config, which parses without torch, transformers or peft
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from ray_med.models.loading import load_config

    if cfg.model.path:
        hf_config = load_config(cfg.model.path)
    else:
        hf_config = preset_config(cfg.model.preset or "", vocab_size=cfg.model.vocab_size)
    rows = []
    for entry in cfg.entries:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(hf_config)
        model = peft.get_peft_model(base, peft_config(entry.adapter, model_config=hf_config))
        trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
        # Prompt-learning methods keep their virtual-token table outside model.parameters()
        # of the base, but PeftModel exposes it; total is the base plus the adapter.
        rows.append({
            "name": entry.name,
            "method": entry.adapter.method,
            "trainable": trainable,
            "total": total,
            "fraction": trainable / total,
            "expected": entry.expected,
            "matches": None if entry.expected is None else trainable == entry.expected,
        })
    return {"model": cfg.model.path or cfg.model.preset, "rows": rows}


def format_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Trainable parameters on {report['model']}",
        "",
        "| setting | method | trainable | fraction | paper |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        paper = "" if r["expected"] is None else f"{r['expected']:,} ({'match' if r['matches'] else 'DIFFERS'})"
        lines.append(f"| {r['name']} | {r['method']} | {r['trainable']:,} | {r['fraction']:.4%} | {paper} |")
    return "\n".join(lines)


@dataclass
class PeftReportOutputs:
    """The report: the model and one row per entry."""

    model: str
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_peft_report(cfg: PeftReportConfig) -> PeftReportOutputs:
    """Print the report as a markdown table, then as one JSON object (the last line)."""
    report = peft_report(cfg)
    print(format_markdown(report))
    print(json.dumps(report))
    return PeftReportOutputs(model=report["model"], rows=report["rows"])
