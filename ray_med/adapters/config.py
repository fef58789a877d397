"""The adapter section of a job config: one flat, typed config for every adapter method.

A method reads the fields it uses (LoRA: ``r``, ``alpha``, ``dropout``,
``target_modules``; prefix/prompt/P-tuning: ``num_virtual_tokens``, ...), so a sweep or a
job switches method with one key (``adapter.method=prefix``) and keeps the rest. Which
methods exist is the adapter registry's business (:mod:`ray_med.adapters.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ray_med.adapters.registry import METHODS, get_method
from ray_med.errors import ConfigError

# Built from the registry, so a newly registered method is a valid value (and --help lists it).
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]


@dataclass
class AdapterConfig:
    """One adapter. Defaults are Clinical LLaMA-LoRA's best: LoRA r=16, alpha=32, dropout 0 on q/v."""

    method: Method = "lora"
    """An adapter method of the registry: lora | adaption_prompt (LLaMA-Adapter) | prefix | prompt | ptuning."""
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"adapter.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.r < 1 or self.num_virtual_tokens < 1 or self.adapter_len < 1:
            raise ConfigError("adapter.r, num_virtual_tokens and adapter_len must be >= 1")

    @property
    def is_prompt_learning(self) -> bool:
        """Prefix, prompt and P-tuning prepend virtual tokens instead of changing weights."""
        return get_method(self.method).prompt_learning
