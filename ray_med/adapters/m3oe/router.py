"""M3OE's gate: pure tensor maths from two embedded texts to one weight per expert per sample.

For each sample, the modality description (``"Image only"``) attends to the task
description, and the pooled result picks the experts:

* ``Q = modality_emb W_q``, ``K = task_emb W_k``, ``V = task_emb W_v``;
* ``A = softmax(Q K^T / sqrt(gate_dim))`` over the task's real tokens (padding masked);
* ``H = A V``; ``h`` = mean of ``H`` over the modality's real tokens;
* ``p = softmax(h W_g)`` over the E experts; top-k keeps the k largest, renormalised.

``gate_inputs="task_only"`` (``"modality_only"``) takes Q, K and V all from the task
(modality) text. The functions take tensors a test can build by hand;
:class:`Router` holds the weights, :class:`GateStats` sums up which experts each task
uses. Only torch: no Ray, no transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ray_med.errors import ConfigError


@dataclass
class GateOutput:
    """One gate per sample."""

    weights: torch.Tensor
    """(B, E): the weights the experts are mixed with (after top-k: the others exactly 0)."""
    probs: torch.Tensor
    """(B, E): the dense softmax before top-k (what load balancing and the statistics read)."""


def _mask(mask: torch.Tensor | None, emb: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
    return mask.to(device=emb.device).bool()


def gate_probs(q_emb: torch.Tensor, q_mask: torch.Tensor | None, kv_emb: torch.Tensor, kv_mask: torch.Tensor | None,
               w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_g: torch.Tensor) -> torch.Tensor:
    """(B, E) dense gate probabilities: ``softmax(mean_q(softmax(Q K^T / sqrt(d)) V) W_g)``.

    ``q_emb`` (B, Lq, hidden) are the queries' token embeddings and ``kv_emb`` (B, Lk,
    hidden) the keys' and values'; masks are (B, L), 1 for a real token, 0 for padding
    (None: all real). The weights are matrices in the maths' orientation, ``Q = q_emb @
    w_q``: ``w_q``, ``w_k``, ``w_v`` are (hidden, gate_dim) and ``w_g`` (gate_dim, E), i.e.
    an ``nn.Linear``'s ``weight.T``. Padded keys get no attention; padded queries are left
    out of the mean.
    """
    qm, kvm = _mask(q_mask, q_emb), _mask(kv_mask, kv_emb)
    q, k, v = q_emb @ w_q, kv_emb @ w_k, kv_emb @ w_v
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, Lq, Lk)
    # The dtype's lowest value rather than -inf: a text that is all padding gets a uniform
    # attention instead of NaNs.
    scores = scores.masked_fill(~kvm[:, None, :], torch.finfo(scores.dtype).min)
    h_tokens = torch.softmax(scores, dim=-1) @ v  # (B, Lq, gate_dim)
    weights = qm.to(h_tokens.dtype).unsqueeze(-1)
    h = (h_tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return torch.softmax(h @ w_g, dim=-1)


def select_top_k(probs: torch.Tensor, k: int | None) -> torch.Tensor:
    """``probs`` (B, E) with all but each row's k largest set to exactly 0, renormalised to sum 1.

    ``k=None`` (or k >= E) returns ``probs`` unchanged. Ties go to the lower expert index
    (``torch.topk``'s order).
    """
    if k is None or k >= probs.shape[-1]:
        return probs
    if k < 1:
        raise ConfigError(f"m3oe top_k must be >= 1, got {k}")
    top = probs.topk(k, dim=-1).indices
    keep = torch.zeros_like(probs).scatter(-1, top, 1.0)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)


def load_balance_loss(probs: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Switch Transformer's load-balancing loss ``E * sum_e f_e * P_e`` of dense gate probabilities (B, E).

    ``f_e`` is the fraction of the batch's (sample, slot) assignments that go to expert e
    when each sample is routed to its top ``k`` experts (the mean over samples of
    ``1[e in top-k] / k``: no gradient), and ``P_e`` the mean probability of e (the
    gradient flows through it). ``k=None`` (a dense gate) counts top-1 assignments, as
    Switch does. The loss is 1.0 for a uniform router and for perfectly balanced
    assignments, and grows to E when every sample sends everything to one expert.
    """
    experts = probs.shape[-1]
    k = 1 if k is None else min(k, experts)
    top = probs.detach().topk(k, dim=-1).indices
    f = torch.zeros_like(probs).scatter(-1, top, 1.0 / k).mean(0)
    return experts * (f * probs.mean(0)).sum()


def gate_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B,) entropy of each row of ``probs`` in nats (natural log; 0 log 0 = 0): log E uniform, 0 one-hot."""
    return -torch.special.xlogy(probs, probs).sum(-1)


class Router(nn.Module):
    """The gate's weights (``w_q``, ``w_k``, ``w_v``: hidden -> gate_dim; ``w_g``: gate_dim -> E; no bias)."""

    def __init__(self, hidden_size: int, experts: int, *, gate_dim: int | None = None, top_k: int | None = None,
                 gate_inputs: str = "both", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        gate_dim = gate_dim or hidden_size
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.w_q = nn.Linear(hidden_size, gate_dim, **kw)
        self.w_k = nn.Linear(hidden_size, gate_dim, **kw)
        self.w_v = nn.Linear(hidden_size, gate_dim, **kw)
        self.w_g = nn.Linear(gate_dim, experts, **kw)
        self.experts, self.top_k, self.gate_inputs = experts, top_k, gate_inputs

    def forward(self, modality_emb: torch.Tensor, modality_mask: torch.Tensor | None, task_emb: torch.Tensor,
                task_mask: torch.Tensor | None) -> GateOutput:
        """The gate of each sample from its embedded modality and task texts ((B, L, hidden) each)."""
        dtype = self.w_q.weight.dtype
        modality_emb, task_emb = modality_emb.to(dtype), task_emb.to(dtype)
        if self.gate_inputs == "both":
            q, qm, kv, kvm = modality_emb, modality_mask, task_emb, task_mask
        elif self.gate_inputs == "task_only":
            q, qm, kv, kvm = task_emb, task_mask, task_emb, task_mask
        elif self.gate_inputs == "modality_only":
            q, qm, kv, kvm = modality_emb, modality_mask, modality_emb, modality_mask
        else:
            raise ConfigError(f"m3oe gate_inputs must be both, task_only or modality_only, got {self.gate_inputs!r}")
        probs = gate_probs(q, qm, kv, kvm, self.w_q.weight.T, self.w_k.weight.T, self.w_v.weight.T,
                           self.w_g.weight.T)
        return GateOutput(weights=select_top_k(probs, self.top_k), probs=probs)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, top_k={self.top_k}, gate_inputs={self.gate_inputs}"


@dataclass
class _TaskSums:
    n: int = 0
    entropy: float = 0.0
    usage: list[float] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)


class GateStats:
    """Which experts each task's samples use: counts, mean entropy, mean dense probability, argmax shares."""

    def __init__(self) -> None:
        self._tasks: dict[str, _TaskSums] = {}

    def update(self, task: str, output: GateOutput) -> None:
        """Add a batch of ``task``'s samples (their dense ``probs``)."""
        probs = output.probs.detach().float().cpu()
        sums = self._tasks.setdefault(task, _TaskSums(usage=[0.0] * probs.shape[-1], top1=[0] * probs.shape[-1]))
        if len(sums.usage) != probs.shape[-1]:
            raise ValueError(f"gate of task {task!r} has {probs.shape[-1]} experts, earlier ones had {len(sums.usage)}")
        sums.n += probs.shape[0]
        sums.entropy += float(gate_entropy(probs).sum())
        sums.usage = [u + float(p) for u, p in zip(sums.usage, probs.sum(0).tolist(), strict=True)]
        counts = torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]).tolist()
        sums.top1 = [t + c for t, c in zip(sums.top1, counts, strict=True)]

    def summary(self) -> dict[str, dict[str, object]]:
        """``{task: {"n", "entropy" (mean, nats), "usage" (mean probability per expert), "top1" (share of
        samples whose argmax is each expert)}}``."""
        return {
            task: {
                "n": s.n,
                "entropy": s.entropy / s.n if s.n else 0.0,
                "usage": [u / s.n if s.n else 0.0 for u in s.usage],
                "top1": [t / s.n if s.n else 0.0 for t in s.top1],
            }
            for task, s in self._tasks.items()
        }
