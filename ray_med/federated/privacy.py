"""Client-level differential privacy as in DP-FedAvg (McMahan et al., 2018): clip, noise, account. No Ray.

* Each client clips its whole update (every modality it holds) to L2 norm ``clip``
  before sending it (:func:`clip_update`), so one client moves the sum by at most
  ``clip``: the sensitivity, whether or not the server ever sees the update alone
  (secure aggregation).
* The server adds Gaussian noise with standard deviation ``z·clip`` to each summed
  coordinate and divides by the *expected* number of clients holding the modality,
  ``q·N`` (the fixed-denominator estimator: the real count would leak who took part).
  :func:`noise_std` is the standard deviation that lands on the averaged update.
* :class:`Accountant` keeps the rounds' (z, q) and answers ε for a given δ with Opacus's
  RDP accountant (Mironov, 2017): client sampling with rate ``q`` is the subsampled
  Gaussian mechanism, one step per round.

Weighting by n_k is dropped under DP (every client weighs 1): weights proportional to
data size would make a large hospital's sensitivity larger than ``clip``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ray_med.federated.strategies import Weights, modality_of

# Opacus's default orders, plus the few small ones its documentation's example uses.
ALPHAS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def update_norm(update: Weights) -> float:
    """L2 norm of the whole update (every key)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def clip_update(update: Weights, clip: float) -> tuple[Weights, float]:
    """The update scaled to norm at most ``clip`` (unchanged when within it), and its norm before clipping."""
    norm = update_norm(update)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, np.float64) * factor for k, v in update.items()}, norm


def noise_std(noise_multiplier: float, clip: float, expected_clients: float) -> float:
    """Standard deviation of the noise on each coordinate of the averaged update: ``z·clip / (q·N)``."""
    return noise_multiplier * clip / expected_clients


def add_noise(total: Weights, *, noise_multiplier: float, clip: float, rng: np.random.Generator) -> Weights:
    """``total`` (a sum of clipped updates) plus N(0, (z·clip)²) on every coordinate, keys in sorted order."""
    return {k: total[k] + rng.normal(0.0, noise_multiplier * clip, size=np.shape(total[k])) for k in sorted(total)}


def dp_average(noisy_total: Weights, expected: dict[str, float]) -> Weights:
    """The noisy sum over the expected number of clients holding each key's modality."""
    return {k: (v / expected[modality_of(k)]).astype(np.float32) for k, v in noisy_total.items()}


class Accountant:
    """ε spent so far for a δ, from the rounds' (noise multiplier, sampling rate) (Opacus's RDP accountant)."""

    def __init__(self, history: Sequence[Sequence[float]] = ()) -> None:
        from opacus.accountants import RDPAccountant  # lazy: only a DP run needs it

        self._acc = RDPAccountant()
        # Opacus's history is [(noise_multiplier, sample_rate, steps)]; it is our checkpointed state.
        self._acc.history = [(float(z), float(q), int(n)) for z, q, n in history]

    @property
    def history(self) -> list[list[float]]:
        return [[z, q, n] for z, q, n in self._acc.history]

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float, alphas: Sequence[float] = ALPHAS) -> float:
        if not self._acc.history:
            return 0.0
        return float(self._acc.get_epsilon(delta=delta, alphas=list(alphas)))

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, delta: float) -> float:
        """ε if one more round ran (the budget check before a round)."""
        trial = Accountant(self.history)
        trial.step(noise_multiplier, sample_rate)
        return trial.epsilon(delta)
