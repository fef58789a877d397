"""M3OE (FedKIM): a mixture of LoRA experts in every target linear layer, gated per sample by task and modality text.

Each target linear layer gets E LoRA experts (:mod:`~ray_med.adapters.m3oe.layer`). One
gate per sample comes from two short texts, the modality description ("Image only")
and the task description, embedded with the LLM's own input embeddings: the modality
text attends to the task text, and the pooled result is a softmax over the experts
(:mod:`~ray_med.adapters.m3oe.router`, pure maths; optional top-k). The layer computes
``y = W0 x + sum_e g_e (alpha / r) B_e A_e x``. :mod:`~ray_med.adapters.m3oe.model`
injects the layers, sets the gate, saves and loads the adapter, and exports it under a
fixed gate as a plain PEFT LoRA folder or merged weights.

Unlike the PEFT methods, M3OE is not a PEFT adapter: it has no PEFT config, its
``inject`` and ``load`` return the :class:`M3OE` object (the LLM is changed in place and
stays ``M3OE.llm``) rather than the model, it is trained by ``jobs/inject.py`` (not by
``finetune.py``), and it cannot be stacked under a classifier.

Torch is imported only when a name other than the config is used (PEP 562), so the
adapter registry and job configs load without it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_med.adapters.m3oe.config import M3OEConfig
from ray_med.adapters.method import AdapterMethod
from ray_med.errors import ConfigError

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig
    from ray_med.adapters.m3oe.layer import M3OELinear
    from ray_med.adapters.m3oe.model import M3OE
    from ray_med.adapters.m3oe.router import (
        GateOutput,
        GateStats,
        Router,
        gate_entropy,
        gate_probs,
        load_balance_loss,
        select_top_k,
    )

_EXPORTS = {
    "M3OE": "model",
    "M3OELinear": "layer",
    "GateOutput": "router",
    "GateStats": "router",
    "Router": "router",
    "gate_entropy": "router",
    "gate_probs": "router",
    "load_balance_loss": "router",
    "select_top_k": "router",
}

__all__ = [
    "METHOD",
    "M3OE",
    "GateOutput",
    "GateStats",
    "M3OEConfig",
    "M3OELinear",
    "M3OEMethod",
    "Router",
    "gate_entropy",
    "gate_probs",
    "load_balance_loss",
    "select_top_k",
]

TRAINING_JOB = "jobs/inject.py"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ray_med.adapters.m3oe.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _peft_config(cfg: AdapterConfig, task_type: str | None, model_config: Any) -> Any:
    raise ConfigError("adapter.method m3oe has no PEFT config: it is gated by task and modality text and trains "
                      f"with {TRAINING_JOB}")


@dataclass(frozen=True)
class M3OEMethod(AdapterMethod):
    """The registry's entry for M3OE: its own injection and loading (no PEFT), and no stacking."""

    trained_by: str = TRAINING_JOB
    """The job that trains it; the PEFT jobs (finetune's domain and downstream stages) refuse it."""

    @property
    def stackable(self) -> bool:
        """No: its layers need a gate from task and modality text, which a stacked classifier never sets."""
        return False

    def inject(self, model: Any, cfg: AdapterConfig, *, task_type: str | None = "CAUSAL_LM",
               adapter_name: str = "default") -> M3OE:
        """The :class:`M3OE` object (not the model, unlike PEFT methods): ``model`` gets its layers in place.

        ``task_type`` and ``adapter_name`` are PEFT's and are ignored: one M3OE adapter per model.
        """
        from ray_med.adapters.m3oe.model import M3OE  # lazy: torch loads only when a model is touched

        return M3OE.inject(model, M3OEConfig.from_adapter_config(cfg))

    def load(self, model: Any, folder: str | Path, *, adapter_name: str = "default", trainable: bool = False) -> M3OE:
        """The :class:`M3OE` saved in ``folder``, its layers put into ``model`` in place (``adapter_name`` ignored)."""
        from ray_med.adapters.m3oe.model import M3OE  # lazy: torch loads only when a model is touched

        return M3OE.load(model, folder, trainable=trainable)


METHOD = M3OEMethod(
    name="m3oe",
    title="M3OE",
    peft_type="M3OE",
    peft_config=_peft_config,
    prompt_learning=False,
    host="own",
    description="FedKIM's mixture of LoRA experts gated by task and modality text (experts, r, alpha, top_k, "
                "gate_inputs); trained by jobs/inject.py",
)
