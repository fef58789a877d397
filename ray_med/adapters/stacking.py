"""Stage-2 models: a base, an optional stage-1 (domain) adapter, an optional new downstream
LoRA, and a classification head, composed rather than subclassed.

Clinical LLaMA-LoRA's own code adds its second adapter but never activates it, so only
one adapter is ever live. Here both LoRA adapters are activated together
(``set_adapter(["domain", "default"])``) and their ``requires_grad`` is set explicitly:
the domain adapter is frozen or trainable as asked, the downstream adapter and the head
always train, and the base never does (unless the setting is full fine-tuning).

The downstream adapter is PEFT's ``default`` adapter, so ``save_pretrained`` writes it
at the root of its folder in the standard PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``), loadable by plain ``PeftModel.from_pretrained``. The
folder a classifier is saved in is :mod:`ray_med.adapters.classifier`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.registry import METHODS, get_method, method_of_folder
from ray_med.errors import ConfigError

Pooling = Literal["mean", "last", "cls"]
Setting = Literal["head_only", "adapter", "full"]
DOMAIN, DOWNSTREAM = "domain", "default"


@dataclass
class ClassifierSpec:
    """How a stage-2 classifier is composed."""

    num_labels: int
    task_type: Literal["binary", "multiclass", "multilabel"] = "multiclass"
    pooling: Pooling = "mean"
    setting: Setting = "adapter"
    domain_adapter: str | None = None
    domain_trainable: bool = False
    downstream: AdapterConfig | None = field(default_factory=AdapterConfig)
    labels: list[str] = field(default_factory=list)


class SequenceClassifier(nn.Module):
    """A transformer body, a pooling of its last hidden states, and a linear head."""

    def __init__(self, body: nn.Module, hidden_size: int, num_labels: int, pooling: Pooling) -> None:
        super().__init__()
        self.body = body
        self.pooling = pooling
        self.head = nn.Linear(hidden_size, num_labels)

    def _transformer(self) -> nn.Module:
        # Adapters are injected into the body's modules in place, so calling the bare
        # transformer (no LM head: no vocab-sized logits to throw away) runs them too.
        body = self.body.get_base_model() if hasattr(self.body, "get_base_model") else self.body
        return body.base_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self._transformer()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # last real token (right padding)
            last = attention_mask.sum(1) - 1
            pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        return self.head(pooled.to(self.head.weight.dtype))


def _stackable() -> str:
    return " or ".join(m.name for m in METHODS.values() if m.stackable)


def build_classifier(base: nn.Module, spec: ClassifierSpec) -> SequenceClassifier:
    """Compose ``base`` + adapters + head as ``spec`` says; set what trains."""
    hidden = base.config.hidden_size
    if spec.setting == "full":
        if spec.domain_adapter or spec.downstream:
            raise ConfigError("full fine-tuning takes no adapters (set domain_adapter and downstream to null)")
        body: nn.Module = base
        for p in body.parameters():
            p.requires_grad = True
        return SequenceClassifier(body, hidden, spec.num_labels, spec.pooling)

    for p in base.parameters():
        p.requires_grad = False
    body = base
    active: list[str] = []
    if spec.domain_adapter:
        method = method_of_folder(spec.domain_adapter)
        if method is None or not method.stackable:
            raise ConfigError(f"a stage-1 prompt-learning adapter cannot be stacked; use {_stackable()}")
        body = method.load(base, spec.domain_adapter, adapter_name=DOMAIN, trainable=spec.domain_trainable)
        active.append(DOMAIN)
    if spec.setting == "adapter" and spec.downstream is not None:
        method = get_method(spec.downstream.method)
        if not method.stackable:
            raise ConfigError(f"the downstream adapter of a classifier must be {_stackable()}")
        body = method.inject(body, spec.downstream, task_type=None, adapter_name=DOWNSTREAM)
        active.append(DOWNSTREAM)
    if len(active) > 1:
        body.base_model.set_adapter(active)  # both live at once: the bug this fixes
    for name, p in body.named_parameters():
        if f".{DOMAIN}." in name:
            p.requires_grad = spec.domain_trainable
        elif f".{DOWNSTREAM}." in name:
            p.requires_grad = True
        else:
            p.requires_grad = False
    return SequenceClassifier(body, hidden, spec.num_labels, spec.pooling)


def describe_trainable(model: nn.Module) -> dict[str, Any]:
    """Trainable parameters in the body (adapters or all) and the head."""
    body = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))
    head = sum(p.numel() for p in model.head.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": body + head, "trainable_body": body, "head": head, "total": total}


