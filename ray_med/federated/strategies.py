"""Federated strategies as pure maths over named arrays: aggregation and the server step. No Ray.

Weights are a flat ``dict[str, np.ndarray]`` whose keys start with their modality
(``image/encoder.conv.0.weight``, ``image/head.pneumonia.weight``). A client returns the
keys of the modalities it holds, so every sum below runs per key over the clients that
hold that key's modality: per-modality aggregation is the only aggregation there is.

A round is two steps:

1. :func:`aggregate`: the clients' contributions become one update per key,
   ``Δ = Σ_k c_k / Σ_k s_k``. A client contributes ``c_k = n_k·(w_k − w)`` and
   ``s_k = n_k`` (weighted FedAvg, McMahan et al., 2017); under client-level DP it
   contributes its clipped update with ``s_k = 1`` and the server divides by the expected
   number of clients instead (see :mod:`ray_med.federated.privacy`). The sums may come
   from secure aggregation (:mod:`ray_med.federated.secagg`): only ``Σ c_k`` and ``Σ s_k``
   are ever needed.
2. :meth:`Strategy.apply`: the server's step with that update. FedAvg and FedProx take
   it as is (``w + Δ``, the weighted mean of the clients' weights); FedAdam (Reddi et
   al., 2021, Alg. 2) treats it as a pseudo-gradient.

FedProx (Li et al., 2020) changes the client, not the server: its local loss gains
``(μ/2)·‖w − w_global‖²`` (:func:`proximal_term`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_med.errors import ConfigError

Weights = dict[str, np.ndarray]


def modality_of(key: str) -> str:
    """The modality a weight belongs to (its key's first segment)."""
    return key.split("/", 1)[0]


@dataclass
class Contribution:
    """What one client sends for a round: per-key sums it adds, per-modality weights it adds."""

    client: str
    delta: Weights
    """``s_k·(w_k − w)`` for each key of the client's modalities."""
    scale: dict[str, float]
    """``s_k`` per modality (n_k for weighted FedAvg, 1 under DP)."""


def sum_contributions(contributions: Iterable[Contribution]) -> tuple[Weights, dict[str, float]]:
    """``Σ c_k`` per key and ``Σ s_k`` per modality, summed in client order (callers sort, for reproducible floats)."""
    total: Weights = {}
    scale: dict[str, float] = {}
    for c in contributions:
        for key, value in c.delta.items():
            total[key] = total[key] + value if key in total else np.array(value, dtype=np.float64)
        for mod, s in c.scale.items():
            scale[mod] = scale.get(mod, 0.0) + float(s)
    return total, scale


def aggregate(total: Weights, scale: Mapping[str, float]) -> Weights:
    """The update per key: its sum over the clients holding its modality, over their summed weights."""
    out: Weights = {}
    for key, value in total.items():
        s = scale.get(modality_of(key), 0.0)
        if s <= 0:
            raise ValueError(f"{key}: no weight for modality {modality_of(key)!r}")
        out[key] = (value / s).astype(np.float32)
    return out


def weighted_delta(local: Weights, global_w: Weights, n: Mapping[str, int]) -> Contribution:
    """A client's weighted-FedAvg contribution (no DP): ``n_k·(w_k − w)`` per key, ``n_k`` per modality."""
    delta = {k: (np.asarray(v, np.float64) - global_w[k]) * n[modality_of(k)] for k, v in local.items()}
    return Contribution(client="", delta=delta, scale={m: float(c) for m, c in n.items()})


def proximal_term(params: Iterable[Any], anchors: Iterable[Any], mu: float) -> Any:
    """FedProx's ``(μ/2)·Σ‖w − w_global‖²`` over matching tensors (torch: it is part of the client's loss)."""
    total = None
    for p, a in zip(params, anchors, strict=True):
        term = (p - a).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("proximal_term: no parameters")
    return 0.5 * mu * total


@dataclass
class Strategy:
    """The server's step with the aggregated update, and the client's proximal weight."""

    name: str = "fedavg"
    mu: float = 0.0
    """FedProx's μ (0: plain local training)."""
    server_lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    """FedAdam's adaptivity (ε in Reddi et al.)."""
    state: dict[str, Weights] = field(default_factory=dict)
    """The server optimizer's moments (FedAdam: m and v), saved in every round checkpoint."""

    def apply(self, global_w: Weights, update: Weights) -> Weights:
        """The next global weights; keys without an update (no client held them this round) are kept."""
        new = dict(global_w)
        if self.name in ("fedavg", "fedprox"):
            for k, d in update.items():
                new[k] = (global_w[k] + self.server_lr * d).astype(np.float32)
            return new
        m = self.state.setdefault("m", {})
        v = self.state.setdefault("v", {})
        for k, d in update.items():
            d = d.astype(np.float64)
            m[k] = self.beta1 * m.get(k, 0.0) + (1 - self.beta1) * d
            v[k] = self.beta2 * v.get(k, 0.0) + (1 - self.beta2) * d * d
            new[k] = (global_w[k] + self.server_lr * m[k] / (np.sqrt(v[k]) + self.tau)).astype(np.float32)
        return new


STRATEGIES = ("fedavg", "fedprox", "fedadam")


def make_strategy(name: str, *, mu: float = 0.0, server_lr: float | None = None, beta1: float = 0.9,
                  beta2: float = 0.99, tau: float = 1e-3) -> Strategy:
    """A strategy by name; FedProx needs μ > 0, the others use μ as given (FedAvg + a proximal term is FedProx)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "fedprox" and mu <= 0:
        raise ConfigError("strategy fedprox needs strategy.mu > 0 (the proximal weight)")
    if server_lr is None:
        server_lr = 1e-2 if name == "fedadam" else 1.0
    return Strategy(name=name, mu=mu, server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)
