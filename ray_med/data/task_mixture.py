"""Multi-task batches: the mixture ratios of tasks, and a seeded plan of which item fills each batch slot.

Med-PaLM M fine-tunes on a mixture of MultiMedBench tasks, with each task's share of the
samples roughly proportional to its size (small tasks may be upsampled) and at least one
sample of every task in every batch. This module owns that plan as a pure function:

* :func:`mixture_ratios` turns task sizes (and explicit ratios, or upsampling factors)
  into shares that sum to 1;
* :func:`plan_epoch` lays out one epoch: ``n_batches`` batches of ``batch_size``
  ``(task, item_index)`` pairs, the same for the same ``(seed, epoch)`` on any machine;
* :func:`shard` gives each data-parallel rank its batches.

Counting is exact, not sampled: each task's total over the epoch is its ratio's share of
all ``batch_size * n_batches`` slots, rounded by largest remainder, so the realised mix
matches the configured one to within one sample. Only *where* the samples fall is random.

The per-batch minimum wins over the ratio. With ``min_per_task_per_batch=1`` a task
whose share is below ``1 / batch_size`` still fills one slot of every batch, so "at least
one per batch" over-represents tiny tasks (in Med-PaLM M, VQA-RAD is 0.15% of the data
but one sample in each batch); the other tasks share the remaining slots in proportion
to their ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np

from ray_med.errors import ConfigError

Plan = list[list[tuple[str, int]]]


@dataclass(frozen=True)
class MixtureSettings:
    """How tasks are mixed.

    ``ratios``: task -> share of samples (any non-negative weights; normalised). Tasks of
    ``sizes`` left out get ratio 0 and are never sampled. ``None``: shares proportional to
    each task's size times its ``upsample`` factor (default 1).
    ``min_per_task_per_batch``: samples of every task with a non-zero ratio in each batch.
    ``upsample``: task -> factor on its natural size; only with ``ratios=None``.
    """

    ratios: dict[str, float] | None = None
    min_per_task_per_batch: int = 0
    upsample: dict[str, float] | None = None


def _valid_names(sizes: dict[str, int]) -> str:
    return ", ".join(sorted(sizes))


def _check_weights(kind: str, weights: dict[str, float], sizes: dict[str, int]) -> None:
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown} in mixture {kind}; valid tasks: {_valid_names(sizes)}")
    for task, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"mixture {kind} of task '{task}' must be a finite number >= 0, got {w!r}")


def mixture_ratios(sizes: dict[str, int], settings: MixtureSettings) -> dict[str, float]:
    """Each task's share of the samples, summing to 1, keyed like ``sizes`` (zeros included)."""
    if not sizes:
        raise ConfigError("a task mixture needs at least one task")
    for task, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"task '{task}' has size {n!r}; sizes must be integers >= 0")
    if settings.ratios is not None:
        if settings.upsample is not None:
            # Upsampling scales natural sizes; with explicit ratios there are none to scale,
            # and silently ignoring the factors would hide a config mistake.
            raise ConfigError("mixture upsample applies only when ratios is None; give one or the other")
        _check_weights("ratio", settings.ratios, sizes)
        weights = {t: float(settings.ratios.get(t, 0.0)) for t in sizes}
        empty = sorted(t for t, w in weights.items() if w > 0 and sizes[t] == 0)
        if empty:
            raise ConfigError(f"task(s) {empty} have a non-zero mixture ratio but no items to sample")
    else:
        upsample = settings.upsample or {}
        _check_weights("upsample", upsample, sizes)
        weights = {t: sizes[t] * float(upsample.get(t, 1.0)) for t in sizes}
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(f"mixture ratios of tasks {_valid_names(sizes)} are all zero; nothing to sample")
    return {t: w / total for t, w in weights.items()}


def _largest_remainder(shares: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to ``total``, closest to ``shares * total`` (ties: task order)."""
    quotas = {t: s * total for t, s in shares.items()}
    counts = {t: math.floor(q) for t, q in quotas.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(shares, key=lambda t: -(quotas[t] - counts[t]))  # stable: ties keep task order
    for t in by_remainder[:left]:
        counts[t] += 1
    # Shares that sum to a hair over 1 in floating point can floor to one too many.
    for t in reversed(by_remainder):
        if left >= 0:
            break
        if counts[t] > 0:
            counts[t] -= 1
            left += 1
    return counts


def _epoch_counts(ratios: dict[str, float], total: int, forced: int) -> dict[str, int]:
    """Samples of each task over the epoch: the ratio's share of ``total``, but at least ``forced``.

    Tasks whose share falls below the minimum are pinned to it and the others split what
    is left in proportion to their ratios, repeated until no share falls below (pinning a
    task shrinks the others' budget, which can push another one under).
    """
    pinned: dict[str, int] = {}
    while True:
        free = [t for t in ratios if t not in pinned]
        wsum = sum(ratios[t] for t in free)
        counts = _largest_remainder({t: ratios[t] / wsum for t in free}, total - forced * len(pinned))
        low = [t for t in free if counts[t] < forced]
        if not low:
            return {**pinned, **counts}
        pinned.update(dict.fromkeys(low, forced))


def _item_stream(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """``count`` item indices: whole seeded permutations of ``range(size)`` back to back.

    No item repeats until every item has been used. The last, partial pass draws only
    the indices it needs (a uniform prefix of a permutation), so a large task sampled a
    little costs little.
    """
    full, rest = divmod(count, size)
    parts = [rng.permutation(size) for _ in range(full)]
    if rest:
        parts.append(rng.choice(size, rest, replace=False, shuffle=True))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def plan_epoch(
    sizes: dict[str, int],
    settings: MixtureSettings,
    *,
    batch_size: int,
    n_batches: int,
    seed: int,
    epoch: int,
) -> Plan:
    """``n_batches`` batches of exactly ``batch_size`` ``(task, item_index)`` pairs.

    Every batch holds ``min_per_task_per_batch`` samples of each task with a non-zero
    ratio; the rest of the slots are spread over the epoch so that each task's total
    (minimums included) is its ratio's share, rounded by largest remainder (the minimum
    wins where it is larger). Items of a task are drawn without replacement from seeded
    permutations, a fresh permutation each time the task is exhausted and at the start of
    each epoch. Deterministic in ``(seed, epoch)``; different epochs give different orders.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 0:
        raise ConfigError(f"n_batches must be an integer >= 0, got {n_batches!r}")
    for name, value in (("seed", seed), ("epoch", epoch)):
        # SeedSequence takes non-negative integers only.
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    minimum = settings.min_per_task_per_batch
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise ConfigError(f"min_per_task_per_batch must be an integer >= 0, got {minimum!r}")
    ratios = mixture_ratios(sizes, settings)
    names = sorted(t for t, r in ratios.items() if r > 0)  # sorted: the plan must not depend on dict order
    k = len(names)
    if minimum * k > batch_size:
        raise ConfigError(
            f"min_per_task_per_batch={minimum} x {k} tasks = {minimum * k} samples does not fit in "
            f"batch_size={batch_size}"
        )
    if n_batches == 0:
        return []

    counts = _epoch_counts({t: ratios[t] for t in names}, batch_size * n_batches, minimum * n_batches)
    seeds = np.random.SeedSequence([seed, epoch]).spawn(k + 1)
    layout_rng = np.random.default_rng(seeds[0])

    # Task index of every slot: the minimums in the first columns, the other slots dealt
    # from a shuffled list holding each task's remaining count, then each batch shuffled.
    n_min = minimum * k
    grid = np.empty((n_batches, batch_size), dtype=np.int64)
    grid[:, :n_min] = np.repeat(np.arange(k), minimum)
    extra = np.repeat(np.arange(k), [counts[t] - minimum * n_batches for t in names])
    layout_rng.shuffle(extra)
    grid[:, n_min:] = extra.reshape(n_batches, batch_size - n_min)
    grid = layout_rng.permuted(grid, axis=1)

    # Item of every slot, in plan order (batch by batch, slot by slot).
    flat = grid.ravel()
    items = np.empty_like(flat)
    for i, task in enumerate(names):
        where = np.flatnonzero(flat == i)
        items[where] = _item_stream(np.random.default_rng(seeds[i + 1]), sizes[task], len(where))

    task_of = [names[i] for i in flat.tolist()]
    pairs = list(zip(task_of, items.tolist(), strict=True))
    return [pairs[b * batch_size : (b + 1) * batch_size] for b in range(n_batches)]


def shard(plan: Plan, rank: int, world: int) -> Plan:
    """Rank ``rank``'s batches: ``rank, rank + world, ...``, ``len(plan) // world`` of them.

    The last ``len(plan) % world`` batches are dropped, so every rank takes the same
    number of steps (a rank with one batch more would hang the others' collectives).
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"world size must be an integer >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ConfigError(f"rank must be an integer in [0, {world}), got {rank!r}")
    return [plan[rank + i * world] for i in range(len(plan) // world)]
