"""Pure pieces of pretraining: schedule, FLOPs, mixture, held-out split, DeepSpeed config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_med.data.mixture import mixture_counts, split_heldout
from ray_med.errors import ConfigError
from ray_med.evaluation.perplexity import PerplexityAccumulator, eval_batches, lm_nll
from ray_med.training.config import DeepSpeedSettings
from ray_med.training.deepspeed_config import deepspeed_config
from ray_med.training.schedule import flops_per_token, lr_at, mfu, warmup_linear


def test_warmup_then_cosine_to_the_floor() -> None:
    kw = {"peak": 1.0, "warmup_steps": 4, "max_steps": 14, "min_lr_ratio": 0.1}
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.55)  # halfway: floor + (peak - floor) / 2
    assert lr_at(14, **kw) == pytest.approx(0.1)
    assert lr_at(100, **kw) == pytest.approx(0.1)


def test_adapter_schedule_warms_up_then_decays_linearly_to_zero() -> None:
    kw = {"warmup_steps": 2, "total_steps": 6}
    assert [warmup_linear(s, **kw) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert warmup_linear(9, **kw) == 0.0


def test_flops_and_mfu() -> None:
    # 7B-class: 6N dominates; attention adds 12·L·H·S.
    assert flops_per_token(1000, 2, 8, 16) == 6000 + 12 * 2 * 8 * 16
    # An adapter over a frozen base: 6 per trainable weight, 4 per frozen one (forward and
    # the activations' gradient, no weight gradient); the attention term is unchanged.
    assert flops_per_token(10, 2, 8, 16, n_frozen=1000) == 6 * 10 + 4 * 1000 + 12 * 2 * 8 * 16
    full, adapter = flops_per_token(1010, 2, 8, 16), flops_per_token(10, 2, 8, 16, n_frozen=1000)
    assert adapter < full and full - adapter == 2 * 1000
    assert mfu(tokens_per_s=1000, flops_token=1e9, peak_flops=2e12) == pytest.approx(0.5)
    assert mfu(1000, 1e9, 0) == 0.0


def test_mixture_natural_and_weighted() -> None:
    sizes = {"guidelines": 10, "abstracts": 500, "papers": 4000, "replay": 40}
    natural = {n: None for n in sizes}
    assert mixture_counts(sizes, natural) == sizes
    # Weighted sources share the whole budget when none is natural.
    w = mixture_counts({"a": 100, "b": 300}, {"a": 1.0, "b": 1.0})
    assert w == {"a": 200, "b": 200}
    # A natural source keeps its size; weighted ones share the rest.
    mixed = mixture_counts({"a": 100, "b": 300, "c": 600}, {"a": None, "b": 3.0, "c": 1.0})
    assert mixed == {"a": 100, "b": 675, "c": 225}
    with pytest.raises(ConfigError):
        mixture_counts({"a": 1}, {"a": 0.0})


def test_heldout_split_is_stable_and_near_the_fraction() -> None:
    ids = [str(i) for i in range(2000)]
    train, held = split_heldout(ids, "abstracts", 0.1, seed=0)
    assert sorted(train + held) == list(range(2000))
    assert 150 < len(held) < 250
    assert split_heldout(ids, "abstracts", 0.1, seed=0) == (train, held)
    assert split_heldout(ids, "clinical", 0.1, seed=0)[1] != held  # per source
    assert split_heldout(ids, "abstracts", 0.0)[1] == []


def test_deepspeed_config() -> None:
    cpu = deepspeed_config(DeepSpeedSettings(zero_stage=2), micro_batch_size=4, grad_accum=2, grad_clip=1.0,
                           on_gpu=False)
    assert cpu["bf16"]["enabled"] is False and cpu["zero_optimization"]["stage"] == 2
    assert cpu["train_micro_batch_size_per_gpu"] == 4 and cpu["gradient_accumulation_steps"] == 2
    gpu = deepspeed_config(DeepSpeedSettings(zero_stage=3, offload_optimizer=True, offload_params=True),
                           micro_batch_size=1, grad_accum=1, grad_clip=1.0, on_gpu=True)
    assert gpu["bf16"]["enabled"] is True
    assert gpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        DeepSpeedSettings(zero_stage=2, offload_params=True)


def test_eval_shards_make_the_same_number_of_forwards_and_count_every_block_once() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 50)
    blocks = np.random.default_rng(0).integers(0, 50, (7, 6))  # 7 blocks over 3 ranks: 3, 2, 2

    def forward(calls: list[int]):
        def f(ids: torch.Tensor) -> torch.Tensor:
            calls.append(len(ids))
            return emb(ids)
        return f

    whole = lm_nll(forward([]), blocks, batch_size=2)
    calls = {r: [] for r in range(3)}
    parts = [lm_nll(forward(calls[r]), blocks, batch_size=2, rank=r, world=3) for r in range(3)]
    # Rank 0 has 2 batches (2 + 1 blocks); ranks 1 and 2 have one batch of 2 and pad with a dummy forward.
    assert eval_batches(7, 3, 2) == 2
    assert calls == {0: [2, 1], 1: [2, 1], 2: [2, 1]}
    total = sum(parts, PerplexityAccumulator())
    assert total.tokens == whole.tokens == 7 * 5
    assert total.total_nll == pytest.approx(whole.total_nll, rel=1e-6)
    # More ranks than blocks: the empty rank still makes the forwards the others make.
    empty: list[int] = []
    assert lm_nll(forward(empty), blocks[:1], batch_size=2, rank=1, world=2).tokens == 0 and empty == [1]
