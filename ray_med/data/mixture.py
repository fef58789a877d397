"""Mixing sources by weight, and holding documents out for evaluation (pure functions).

Meditron's GAP-Replay mixes its sources at their natural sizes (guidelines 0.23%,
abstracts 11.7%, papers 87.1%, replay 0.9% of tokens). A source may instead be given
a weight: its share of the mixture's sequences becomes weight / sum of weights, and it
is up- or down-sampled to reach that share. The mixture keeps the natural total, so
changing weights changes the proportions, not the length of an epoch.

The held-out split and the tokenizer's training sample are decided per document by a
hash of its id, so they are the same whatever the order, the number of files or the
number of tasks that read the corpus.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from typing import Any

from ray_med.errors import ConfigError


def mixture_counts(sizes: dict[str, int], weights: dict[str, float | None]) -> dict[str, int]:
    """Sequences to draw from each source.

    ``weights[name] is None`` keeps a source's natural size. Weighted sources share
    what the natural-size sources leave of the total, in proportion to their weights.
    """
    total = sum(sizes.values())
    natural = {n: sizes[n] for n in sizes if weights.get(n) is None}
    weighted = {n: float(weights[n]) for n in sizes if weights.get(n) is not None}  # type: ignore[arg-type]
    counts = dict(natural)
    if weighted:
        wsum = sum(weighted.values())
        if wsum <= 0:
            raise ConfigError("source weights must not all be zero")
        budget = total - sum(natural.values())
        if budget <= 0:
            budget = total
        for name, w in weighted.items():
            if sizes[name] == 0 and w > 0:
                raise ConfigError(f"source '{name}' has weight {w} but no sequences to sample")
            counts[name] = round(budget * w / wsum)
    return {n: counts[n] for n in sizes}


def is_heldout(record_id: str, source: str, fraction: float, seed: int = 0) -> bool:
    """Whether a document is held out; stable across runs, machines and worker counts."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{source}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_heldout(
    ids: Sequence[str], source: str, fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Indices of (train, held-out) documents of one source."""
    train, held = [], []
    for i, rid in enumerate(ids):
        (held if is_heldout(rid, source, fraction, seed) else train).append(i)
    return train, held


def sample_key(record_id: str, source: str, seed: int = 0) -> int:
    """A document's rank in the seeded sample (a 64-bit hash; smaller is sampled first).

    Salted apart from :func:`is_heldout`, so which training documents are sampled says
    nothing about how close they came to being held out.
    """
    digest = hashlib.sha256(f"sample:{seed}:{source}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class BottomK:
    """The ``k`` items with the smallest keys of a stream, in O(k) memory.

    With :func:`sample_key` as the key this is a seeded uniform sample without
    replacement that does not depend on the order the items arrive in.
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"a sample needs at least one item, got k={k!r}")
        self.k = k
        self.seen = 0
        self._heap: list[tuple[int, Any]] = []  # (-key, item): the root is the largest kept key

    def add(self, key: int, item: Any) -> None:
        self.seen += 1
        entry = (-key, item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry > self._heap[0]:  # a smaller key than the largest kept one
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list[Any]:
        """The kept items, smallest key first."""
        return [item for _, item in sorted(self._heap, reverse=True)]
