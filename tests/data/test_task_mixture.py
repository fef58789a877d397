"""The multi-task mixture sampler: ratios, per-batch minimums, items without replacement, shards."""

from __future__ import annotations

from collections import Counter

import pytest

from ray_med.data.task_mixture import MixtureSettings, mixture_ratios, plan_epoch, shard
from ray_med.errors import ConfigError

SIZES = {"a": 500, "b": 300, "c": 100}


def _shares(plan: list[list[tuple[str, int]]]) -> dict[str, float]:
    counts = Counter(task for batch in plan for task, _ in batch)
    total = sum(counts.values())
    return {t: n / total for t, n in counts.items()}


def _check_shape(
    plan: list[list[tuple[str, int]]], sizes: dict[str, int], batch_size: int, n_batches: int
) -> None:
    assert len(plan) == n_batches
    for batch in plan:
        assert len(batch) == batch_size
        for task, item in batch:
            assert 0 <= item < sizes[task]


def test_realised_mix_matches_configured_ratios() -> None:
    settings = MixtureSettings(ratios={"a": 0.6, "b": 0.3, "c": 0.1})
    plan = plan_epoch(SIZES, settings, batch_size=16, n_batches=2000, seed=0, epoch=0)
    _check_shape(plan, SIZES, 16, 2000)
    shares = _shares(plan)
    for task, ratio in settings.ratios.items():  # type: ignore[union-attr]
        assert abs(shares[task] - ratio) < 0.01
    # Counting is exact: largest remainder of 0.6 / 0.3 / 0.1 of 32000 slots.
    counts = Counter(t for batch in plan for t, _ in batch)
    assert counts == {"a": 19200, "b": 9600, "c": 3200}


def test_ratios_need_not_sum_to_one_and_missing_tasks_are_left_out() -> None:
    assert mixture_ratios(SIZES, MixtureSettings(ratios={"a": 3, "b": 1})) == {"a": 0.75, "b": 0.25, "c": 0.0}
    plan = plan_epoch(
        SIZES, MixtureSettings(ratios={"a": 3, "b": 1}), batch_size=8, n_batches=10, seed=1, epoch=0
    )
    assert "c" not in _shares(plan)


def test_every_batch_has_every_task_with_a_minimum() -> None:
    settings = MixtureSettings(ratios={"a": 0.6, "b": 0.3, "c": 0.1}, min_per_task_per_batch=1)
    plan = plan_epoch(SIZES, settings, batch_size=16, n_batches=500, seed=3, epoch=0)
    _check_shape(plan, SIZES, 16, 500)
    assert all({t for t, _ in batch} == {"a", "b", "c"} for batch in plan)
    # 0.1 * 16 = 1.6 per batch is above the minimum of 1, so the ratios still hold exactly.
    shares = _shares(plan)
    assert shares["a"] == pytest.approx(0.6) and shares["c"] == pytest.approx(0.1)


def test_tiny_task_still_appears_in_every_batch_and_the_minimum_wins() -> None:
    settings = MixtureSettings(ratios={"a": 0.6, "b": 0.399, "tiny": 0.001}, min_per_task_per_batch=1)
    sizes = {"a": 1000, "b": 1000, "tiny": 5}
    plan = plan_epoch(sizes, settings, batch_size=16, n_batches=1000, seed=0, epoch=0)
    _check_shape(plan, sizes, 16, 1000)
    assert all(sum(t == "tiny" for t, _ in batch) >= 1 for batch in plan)
    counts = Counter(t for batch in plan for t, _ in batch)
    assert counts["tiny"] == 1000  # exactly the forced one per batch: 0.1% of 16000 would be 16
    # a and b split the other 15000 slots 0.6 : 0.399.
    assert counts["a"] / (counts["a"] + counts["b"]) == pytest.approx(0.6 / 0.999, abs=1e-4)


def test_default_is_proportional_to_size() -> None:
    assert mixture_ratios(SIZES, MixtureSettings()) == pytest.approx({"a": 5 / 9, "b": 3 / 9, "c": 1 / 9})
    plan = plan_epoch(SIZES, MixtureSettings(), batch_size=9, n_batches=1000, seed=0, epoch=0)
    shares = _shares(plan)
    assert shares["a"] == pytest.approx(5 / 9) and shares["c"] == pytest.approx(1 / 9)


def test_upsample_scales_a_tasks_natural_size() -> None:
    base = mixture_ratios({"a": 100, "b": 100}, MixtureSettings())
    up = mixture_ratios({"a": 100, "b": 100}, MixtureSettings(upsample={"b": 2.0}))
    assert base == {"a": 0.5, "b": 0.5}
    assert up == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    # c's natural share 100 / 900; doubled it counts as 200 of 1000.
    assert mixture_ratios(SIZES, MixtureSettings(upsample={"c": 2}))["c"] == pytest.approx(0.2)


def test_same_seed_and_epoch_give_the_same_plan_other_epochs_differ() -> None:
    settings = MixtureSettings(ratios={"a": 0.5, "b": 0.3, "c": 0.2}, min_per_task_per_batch=1)
    kwargs = {"batch_size": 8, "n_batches": 50}
    first = plan_epoch(SIZES, settings, **kwargs, seed=7, epoch=0)
    assert plan_epoch(dict(reversed(SIZES.items())), settings, **kwargs, seed=7, epoch=0) == first
    assert plan_epoch(SIZES, settings, **kwargs, seed=7, epoch=1) != first
    assert plan_epoch(SIZES, settings, **kwargs, seed=8, epoch=0) != first


def test_items_are_drawn_without_replacement_and_cycle() -> None:
    sizes = {"a": 10, "b": 7}
    settings = MixtureSettings(ratios={"a": 0.5, "b": 0.5})
    plan = plan_epoch(sizes, settings, batch_size=4, n_batches=25, seed=0, epoch=0)  # 50 samples each
    for task, size in sizes.items():
        seq = [i for batch in plan for t, i in batch if t == task]
        assert len(seq) == 50
        passes = [seq[s : s + size] for s in range(0, len(seq), size)]
        for p in passes[:-1]:
            assert sorted(p) == list(range(size))  # every item once before any repeats
        assert len(set(passes[-1])) == len(passes[-1])
        assert passes[0] != passes[1]  # a fresh permutation each pass


def test_shard_gives_every_rank_the_same_number_of_batches() -> None:
    plan = plan_epoch(SIZES, MixtureSettings(), batch_size=4, n_batches=10, seed=0, epoch=0)
    shards = [shard(plan, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert shards[1] == [plan[1], plan[4], plan[7]]
    assert shard(plan, 0, 1) == plan
    with pytest.raises(ConfigError, match="rank"):
        shard(plan, 3, 3)
    with pytest.raises(ConfigError, match="world"):
        shard(plan, 0, 0)


def test_zero_batches_is_an_empty_plan() -> None:
    assert plan_epoch(SIZES, MixtureSettings(), batch_size=4, n_batches=0, seed=0, epoch=0) == []


@pytest.mark.parametrize(
    ("sizes", "settings", "batch_size", "match"),
    [
        (
            SIZES,
            MixtureSettings(ratios={"a": 1, "zz": 1}),
            8,
            r"unknown task\(s\) \['zz'\].*valid tasks: a, b, c",
        ),
        (SIZES, MixtureSettings(upsample={"zz": 2}), 8, r"unknown task\(s\) \['zz'\] in mixture upsample"),
        (
            SIZES,
            MixtureSettings(ratios={"a": -0.1, "b": 1}),
            8,
            "ratio of task 'a' must be a finite number >= 0",
        ),
        (SIZES, MixtureSettings(upsample={"a": -1}), 8, "upsample of task 'a'"),
        (SIZES, MixtureSettings(ratios={"a": 0, "b": 0}), 8, "all zero"),
        ({"a": 0, "b": 0}, MixtureSettings(), 8, "all zero"),
        (
            {"a": 0, "b": 5},
            MixtureSettings(ratios={"a": 1, "b": 1}),
            8,
            r"\['a'\] have a non-zero mixture ratio",
        ),
        (SIZES, MixtureSettings(ratios={"a": 1}, upsample={"a": 2}), 8, "only when ratios is None"),
        (
            SIZES,
            MixtureSettings(min_per_task_per_batch=3),
            8,
            r"min_per_task_per_batch=3 x 3 tasks = 9 .*batch_size=8",
        ),
        (SIZES, MixtureSettings(min_per_task_per_batch=-1), 8, "min_per_task_per_batch must be"),
        (SIZES, MixtureSettings(), 0, "batch_size must be an integer >= 1"),
        ({}, MixtureSettings(), 8, "at least one task"),
        ({"a": -3}, MixtureSettings(), 8, "sizes must be integers >= 0"),
    ],
)
def test_errors(sizes: dict[str, int], settings: MixtureSettings, batch_size: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_epoch(sizes, settings, batch_size=batch_size, n_batches=4, seed=0, epoch=0)


def test_seed_and_epoch_must_be_non_negative() -> None:
    with pytest.raises(ConfigError, match="seed"):
        plan_epoch(SIZES, MixtureSettings(), batch_size=4, n_batches=1, seed=-1, epoch=0)
    with pytest.raises(ConfigError, match="epoch"):
        plan_epoch(SIZES, MixtureSettings(), batch_size=4, n_batches=1, seed=0, epoch=-1)
