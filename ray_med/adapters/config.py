"""The adapter section of a job config: one flat, typed config for every adapter method.

A method reads the fields it uses (LoRA: ``r``, ``alpha``, ``dropout``,
``target_modules``; prefix/prompt/P-tuning: ``num_virtual_tokens``, ...; M3OE: LoRA's
fields plus ``experts``, ``top_k``, ``gate_inputs``, ``load_balance``), so a sweep or a
job switches method with one key (``adapter.method=prefix``) and keeps the rest. Which
methods exist is the adapter registry's business (:mod:`ray_med.adapters.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ray_med.adapters.m3oe.config import GATE_INPUTS, GateInputs
from ray_med.adapters.registry import METHODS, get_method
from ray_med.errors import ConfigError

# Built from the registry, so a newly registered method is a valid value (and --help lists it).
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]


@dataclass
class AdapterConfig:
    """One adapter. Defaults are Clinical LLaMA-LoRA's best: LoRA r=16, alpha=32, dropout 0 on q/v."""

    method: Method = "lora"
    """An adapter method of the registry: lora | adaption_prompt (LLaMA-Adapter) | prefix | prompt | ptuning |
    m3oe (mixture of LoRA experts gated by task and modality text; trained by jobs/inject.py)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules LoRA wraps (BERT-family encoders name them query/value)."""
    num_virtual_tokens: int = 20
    """Virtual tokens for prefix, prompt and P-tuning."""
    prefix_projection: bool = False
    """Prefix tuning: reparameterize the prefix through an MLP."""
    encoder_hidden_size: int = 128
    """P-tuning prompt encoder (and prefix projection) hidden size."""
    adapter_len: int = 10
    """LLaMA-Adapter: adaption prompt length."""
    adapter_layers: int = 30
    """LLaMA-Adapter: number of top layers that get an adaption prompt."""
    experts: int = 12
    """M3OE: LoRA experts in each target layer (each of rank r, scaled by alpha / r)."""
    top_k: int | None = None
    """M3OE: keep each sample's k largest gate weights, renormalised; null: mix every expert."""
    gate_inputs: GateInputs = "both"
    """M3OE: the gate's texts: both (modality attends to task) | task_only | modality_only."""
    load_balance: float = 0.01
    """M3OE: coefficient of the load-balancing auxiliary loss."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"adapter.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.r < 1 or self.num_virtual_tokens < 1 or self.adapter_len < 1:
            raise ConfigError("adapter.r, num_virtual_tokens and adapter_len must be >= 1")
        if self.experts < 1:
            raise ConfigError(f"adapter.experts must be >= 1, got {self.experts}")
        if self.top_k is not None and not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"adapter.top_k must be null or between 1 and adapter.experts ({self.experts}), "
                              f"got {self.top_k}")
        if self.gate_inputs not in GATE_INPUTS:
            raise ConfigError(f"adapter.gate_inputs must be one of {', '.join(GATE_INPUTS)}, got {self.gate_inputs!r}")
        if self.load_balance < 0:
            raise ConfigError(f"adapter.load_balance must be >= 0, got {self.load_balance}")

    @property
    def is_prompt_learning(self) -> bool:
        """Prefix, prompt and P-tuning prepend virtual tokens instead of changing weights."""
        return get_method(self.method).prompt_learning
