"""One M3OE layer (:class:`M3OELinear`): a frozen linear layer plus E LoRA experts mixed by a per-sample gate.

``y = W0 x + sum_e g_e (alpha / r) B_e A_e x``. The experts are stored stacked
(``lora_A``: (E, r, in), ``lora_B``: (E, out, r)), so a forward pass is two matrix
products over all experts at once, with no Python loop over E. The gate is set on the
layer before the forward pass (:class:`~ray_med.adapters.m3oe.model.M3OE` sets it on
every layer from the task and modality texts), because the LLM calls the layer with the
hidden states only.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class M3OELinear(nn.Module):
    """``base`` (frozen, kept as ``.base``) plus E LoRA experts; A is kaiming-uniform like PEFT, B starts at 0."""

    def __init__(self, base: nn.Linear, *, experts: int, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.experts, self.r, self.alpha = experts, r, alpha
        self.scaling = alpha / r
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(experts, r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, r, **kw))
        with torch.no_grad():
            for e in range(experts):  # per expert: fan_in is in_features, as for PEFT's (r, in) A
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate: torch.Tensor | None = None
        """(B, E): one gate per sample of the batch, or (E,): the same gate for every sample."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads ``q_proj.weight``, e.g. for its dtype, still finds it)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, in) or (B, in) (any (B, ..., in)) -> the base output plus the gated experts' updates."""
        out = self.base(x)
        gate = self.gate
        if gate is None:
            raise RuntimeError("M3OELinear has no gate: set one with M3OE.set_gate(weights) or run the model "
                               "inside M3OE.gate_context(weights)")
        experts, r = self.experts, self.r
        if gate.shape[-1] != experts or gate.dim() not in (1, 2):
            raise ValueError(f"M3OE gate must be (B, {experts}) or ({experts},), got {tuple(gate.shape)}")
        if gate.dim() == 2 and gate.shape[0] != x.shape[0]:
            raise ValueError(f"M3OE gate has {gate.shape[0]} rows for a batch of {x.shape[0]}")
        a = self.lora_A
        h = self.dropout(x).to(a.dtype)
        # All experts' A at once: (..., in) @ (in, E r) -> (..., E, r).
        u = (h @ a.reshape(experts * r, -1).T).unflatten(-1, (experts, r))
        g = gate.to(device=u.device, dtype=u.dtype)
        g = g[:, None] if g.dim() == 1 else g.reshape(g.shape[0], *([1] * (x.dim() - 2)), experts, 1)
        u = (u * (g * self.scaling)).flatten(-2)
        # All experts' B at once: (..., E r) @ (E r, out); B_all[o, e r + j] = lora_B[e, o, j].
        b_all = self.lora_B.permute(1, 0, 2).reshape(self.out_features, experts * r)
        return out + (u @ b_all.T).to(out.dtype)

    def delta_weight(self, gate: torch.Tensor) -> torch.Tensor:
        """(out, in): ``sum_e g_e (alpha / r) B_e A_e`` for one gate (E,), what merging adds to W0."""
        if gate.shape != (self.experts,):
            raise ValueError(f"M3OE delta_weight takes one gate of shape ({self.experts},), got {tuple(gate.shape)}")
        g = gate.to(device=self.lora_A.device, dtype=self.lora_A.dtype)
        return torch.einsum("e,eor,eri->oi", g * self.scaling, self.lora_B, self.lora_A)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, r={self.r}, alpha={self.alpha}"
