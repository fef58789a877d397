"""Perplexity from summed token negative log-likelihoods.

Perplexity is ``exp(total NLL / total tokens)`` over the whole held-out set. Averaging
per-batch perplexities instead would weight short batches like long ones, so batches
are accumulated as sums and only divided at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def perplexity(total_nll: float, tokens: int) -> float:
    """``exp(total_nll / tokens)``; ``inf`` when the mean NLL overflows ``exp``."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    mean = total_nll / tokens
    return math.exp(mean) if mean < 709 else math.inf


@dataclass
class PerplexityAccumulator:
    """Sums NLL and token counts over batches (and over ranks, by adding accumulators)."""

    total_nll: float = 0.0
    tokens: int = 0

    def add(self, mean_loss: float, tokens: int) -> None:
        """Add a batch given its mean per-token loss and its number of predicted tokens."""
        self.total_nll += float(mean_loss) * tokens
        self.tokens += int(tokens)

    def __add__(self, other: PerplexityAccumulator) -> PerplexityAccumulator:
        return PerplexityAccumulator(self.total_nll + other.total_nll, self.tokens + other.tokens)

    @property
    def loss(self) -> float:
        return self.total_nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return perplexity(self.total_nll, self.tokens)


def eval_batches(n_blocks: int, world: int, batch_size: int) -> int:
    """Batches every rank runs when ``n_blocks`` are dealt out ``blocks[rank::world]``: rank 0's, the most."""
    return math.ceil(math.ceil(n_blocks / world) / batch_size)


def lm_nll(
    forward: Callable[[Any], Any],
    blocks: np.ndarray,
    *,
    batch_size: int = 8,
    device: Any = "cpu",
    rank: int = 0,
    world: int = 1,
) -> PerplexityAccumulator:
    """Summed next-token NLL of a causal LM over packed ``(n, seq_len)`` blocks.

    ``forward(input_ids)`` returns logits (a model, or a DeepSpeed engine's forward);
    each block predicts its ``seq_len - 1`` next tokens. The in-training evaluation and
    ``jobs/evaluate.py perplexity`` both call this, so their numbers agree.

    With ``world`` data-parallel ranks, this rank scores ``blocks[rank::world]`` (every
    block on exactly one rank; add the ranks' accumulators) and calls ``forward``
    :func:`eval_batches` times like every other rank: a rank with fewer blocks pads with
    forwards on a one-block dummy batch whose output is dropped. Under ZeRO-3 every
    forward all-gathers the weights, so a rank that stopped early would hang the others.
    """
    acc = PerplexityAccumulator()
    mine = blocks[rank::world]
    with torch.no_grad():
        for b in range(eval_batches(len(blocks), world, batch_size)):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            if len(chunk) == 0:
                forward(torch.zeros((1, blocks.shape[1]), dtype=torch.long, device=device))  # padding: not counted
                continue
            ids = torch.tensor(chunk, dtype=torch.long, device=device)  # a copy: blocks may be read-only
            out = forward(ids)
            logits = getattr(out, "logits", out).float()
            # Prompt-learning adapters (prompt tuning, P-tuning) prepend virtual tokens and
            # return logits for them too; the real tokens' logits are the last ones.
            logits = logits[:, -ids.size(1) :]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"
            )
            acc.total_nll += float(nll)
            acc.tokens += int(ids[:, 1:].numel())
    return acc
