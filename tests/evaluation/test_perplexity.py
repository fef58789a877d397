"""Perplexity maths with hand-computed values."""

from __future__ import annotations

import math

import pytest

from ray_med.evaluation.perplexity import PerplexityAccumulator, perplexity


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    # A uniform model over 50 tokens has NLL log(50) per token.
    assert perplexity(10 * math.log(50), 10) == pytest.approx(50.0)


def test_accumulator_weights_batches_by_tokens() -> None:
    acc = PerplexityAccumulator()
    acc.add(mean_loss=1.0, tokens=30)
    acc.add(mean_loss=2.0, tokens=10)
    # (30*1 + 10*2) / 40 = 1.25, not the unweighted mean 1.5.
    assert acc.loss == pytest.approx(1.25)
    assert acc.perplexity == pytest.approx(math.exp(1.25))
    merged = acc + PerplexityAccumulator(total_nll=5.0, tokens=10)
    assert merged.loss == pytest.approx((50 + 5) / 50)


def test_edge_cases() -> None:
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    assert perplexity(1e6, 1) == math.inf
    assert math.isnan(PerplexityAccumulator().loss)
