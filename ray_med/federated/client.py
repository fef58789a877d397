"""What one hospital does in a round, in plain torch: local training through the shared loop, and scoring. No Ray.

:func:`fit_client` takes the global weights and the client's rows of each modality it
holds, trains each modality's encoder and head for ``epochs`` local epochs with
:func:`ray_med.training.loop.run_loop` (FedProx adds ``(μ/2)·‖w − w_global‖²`` to the
loss), and returns its :class:`~ray_med.federated.strategies.Contribution`:

* without DP: ``n_k·(w_k − w)`` and ``n_k`` per modality (weighted FedAvg);
* with DP: the whole update clipped to ``clip`` (every modality together) and weight 1;
* with secure aggregation the same numbers, packed and masked by the executor.

Everything a client does is seeded by (run seed, round, client), so a resumed federation
repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_med.federated.config import LocalConfig
from ray_med.federated.models import EncoderSpec, ModalityModel, build_model, load_weights, trainable_weights
from ray_med.federated.privacy import clip_update
from ray_med.federated.strategies import Contribution, Weights, proximal_term, weighted_delta
from ray_med.training.loop import LoopSettings, StepResult, run_loop


def client_seed(seed: int, round_: int, client: str) -> int:
    """The seed of one client's work in one round (stable across processes, unlike ``hash``)."""
    return (seed * 1_000_003 + round_ * 7919 + zlib.crc32(client.encode())) % (2**31 - 1)


_MODELS: dict[str, ModalityModel] = {}


def cached_model(spec: EncoderSpec, seed: int) -> ModalityModel:
    """A model for ``spec``, built once per process (a pretrained text encoder is read once, not per client).

    Callers load the weights they need into it first (``load_weights``): every trainable
    weight is overwritten, and the frozen ones are the same for everyone.
    """
    key = json.dumps([asdict(spec), seed], sort_keys=True)
    if key not in _MODELS:
        _MODELS[key] = build_model(spec, seed)
    return _MODELS[key]


def train_modality(model: ModalityModel, task: str, x: np.ndarray, y: np.ndarray, s: LocalConfig, *,
                   seed: int, mu: float = 0.0) -> dict[str, Any]:
    """Train the model on (x, y) for ``s.epochs`` epochs in place; return the loop's last train loss and steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if mu > 0 else []
    # SGD by default: the optimizer starts afresh each round, and Adam's first steps from a fresh
    # state are full-size moves toward the client's own (skewed) data.
    if s.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    model.train()

    def batches(epoch: int, skip: int):
        order = np.random.default_rng([seed, epoch]).permutation(len(yt))
        # Every row is used each epoch (a last short batch included): a small hospital's few rows all count.
        for i in range(skip * s.batch_size, len(order), s.batch_size):
            yield order[i:i + s.batch_size]

    def step(idx: np.ndarray, boundary: bool) -> StepResult:
        idx_t = torch.from_numpy(idx)
        loss = loss_fn(model(xt[idx_t], task), yt[idx_t])
        if mu > 0:
            loss = loss + proximal_term(params, anchors, mu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return StepResult(loss=loss.detach(), tokens=0, samples=len(idx))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = run_loop(LoopSettings(name="client", epochs=s.epochs, log_every=0, per_epoch=True),
                         step=step, batches=batches)
    losses = [r["train_loss"] for r in state.history if "train_loss" in r]
    return {"loss": float(losses[-1]) if losses else float("nan"), "steps": state.step}


def fit_client(client: str, global_w: Weights, data: dict[str, tuple[EncoderSpec, str, np.ndarray, np.ndarray]],
               s: LocalConfig, *, seed: int, round_: int, mu: float = 0.0,
               dp_clip: float | None = None) -> tuple[Contribution, dict[str, Any]]:
    """One round at one client: ``data`` maps each modality it holds to (spec, task, x, y)."""
    cseed = client_seed(seed, round_, client)
    local: Weights = {}
    n: dict[str, int] = {}
    metrics: dict[str, Any] = {}
    torch.set_num_threads(1)  # a pool actor is one CPU; more threads only contend
    for mod in sorted(data):
        spec, task, x, y = data[mod]
        model = cached_model(spec, seed)
        load_weights(model, global_w)  # every trainable weight: the cached model keeps nothing from its last client
        m = train_modality(model, task, x, y, s, seed=cseed, mu=mu)
        local.update(trainable_weights(model))
        n[mod] = int(len(y))
        metrics[mod] = {**m, "n": n[mod]}
    if dp_clip is not None:
        delta = {k: np.asarray(v, np.float64) - global_w[k] for k, v in local.items()}
        clipped, norm = clip_update(delta, dp_clip)
        metrics["update_norm"] = norm
        return Contribution(client=client, delta=clipped, scale={m: 1.0 for m in n}), metrics
    contribution = weighted_delta(local, global_w, n)
    contribution.client = client
    return contribution, metrics


@torch.no_grad()
def predict(model: ModalityModel, task: str, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, C)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        out.append(torch.softmax(model(torch.from_numpy(x[i:i + batch_size]), task), -1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.spec.tasks[task])), np.float32)
