"""Search spaces as config-path data: strict trial configs, early errors, the trial table (no Ray cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_med.config import load_config, to_dict
from ray_med.errors import ConfigError
from ray_med.training.config import FinetuneConfig
from ray_med.tuning.report import TrialRow, best_trial, end_status, summary_table, trials_csv
from ray_med.tuning.space import base_data, check_space, grid_size, parse_space, trial_config, trial_overrides

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "jobs/configs/finetune/pubmedqa_rf_minilm_lora.yaml")
OVERRIDES = ["bootstrap=100", "train.epochs=3"]


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_a_trial_config_is_the_base_config_plus_its_sampled_overrides() -> None:
    params = parse_space({
        "train.lr": {"loguniform": [1e-4, 3e-3]},
        "adapter": {"r": {"choice": [4, 8]}, "target_modules": {"choice": [["query", "value"], ["query", "key"]]}},
    })
    assert list(params) == ["train.lr", "adapter.r", "adapter.target_modules"]  # nested keys mean dotted ones
    data = base_data(FinetuneConfig, BASE, OVERRIDES)
    check_space(FinetuneConfig, data, params)
    # A searcher hands back numpy scalars, and list choices as their YAML text (Optuna holds scalars only).
    np = pytest.importorskip("numpy")
    tm = params["adapter.target_modules"]
    assert tm.encoded and tm.search_values() == ["[query, value]", "[query, key]"]
    sampled = {"train.lr": np.float64(0.00123), "adapter.r": np.int64(8), "adapter.target_modules": "[query, key]"}
    trial = trial_config(FinetuneConfig, data, params, sampled)

    expected = load_config(FinetuneConfig, BASE, [*OVERRIDES, "train.lr=0.00123", "adapter.r=8",
                                                  "adapter.target_modules=[query, key]"])
    assert trial == expected
    base = _leaves(to_dict(load_config(FinetuneConfig, BASE, OVERRIDES)))
    changed = {k for k, v in _leaves(to_dict(trial)).items() if base[k] != v}
    assert changed == {"train.lr", "adapter.r", "adapter.target_modules"}
    assert trial.adapter.target_modules == ["query", "key"] and type(trial.adapter.r) is int
    # The exported best config comes from the decoded values and is the same config.
    decoded = {"train.lr": 0.00123, "adapter.r": 8, "adapter.target_modules": ["query", "key"]}
    assert trial_config(FinetuneConfig, data, params, decoded, decoded=True) == trial
    assert trial_overrides(params, decoded, decoded=True)[2] == "adapter.target_modules=[query, key]"


@pytest.mark.parametrize(("space", "message"), [
    ({"adapter.rr": {"choice": [4, 8]}}, "space.adapter.rr: unknown config key 'adapter.rr'.*Did you mean 'r'"),
    ({"trian.lr": {"uniform": [0.1, 0.2]}}, "unknown config key 'trian'.*Did you mean 'train'"),
    ({"adapter.r": {"choice": ["big"]}}, "space.adapter.r"),
])
def test_an_unknown_path_or_a_bad_value_fails_before_any_trial(space: dict, message: str) -> None:
    data = base_data(FinetuneConfig, BASE, OVERRIDES)
    with pytest.raises(ConfigError, match=message) as err:
        check_space(FinetuneConfig, data, parse_space(space))
    assert "\n" not in str(err.value)
    if "unknown config key" in message:  # the valid keys at that level are listed
        assert "Valid keys" in str(err.value)


@pytest.mark.parametrize(("space", "message"), [
    ({"adapter.r": {"choice": []}}, "the choice list is empty"),
    ({"train.lr": {"loguniform": [3e-3, 1e-4]}}, "low > high"),
    ({"train.lr": {"uniform": [0.2, 0.1]}}, "low > high"),
    ({"train.lr": {"loguniform": [0.0, 1e-3]}}, "needs low > 0"),
    ({"adapter.r": {"randint": [4.5, 8]}}, "integer bounds"),
    ({"train.lr": {"normal": [0, 1]}}, "expected one of"),
    ({"train.lr": {"uniform": [1]}}, "takes \\[low, high\\]"),
    ({"data.dev_size": {"choice": [10, 20]}}, "'data' cannot be swept"),
    ({"train.max_length": {"choice": [64, 128]}}, "'train.max_length' cannot be swept"),
    ({}, "space is empty"),
])
def test_a_malformed_distribution_fails_in_one_line(space: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_space(space)
    assert "\n" not in str(err.value)


def test_the_grid_takes_choice_lists_only() -> None:
    assert grid_size(parse_space({"adapter.r": {"choice": [4, 8, 16]}, "adapter.alpha": {"choice": [8, 16]}})) == 6
    with pytest.raises(ConfigError, match="grid searcher takes choice lists only"):
        grid_size(parse_space({"train.lr": {"loguniform": [1e-4, 1e-3]}}))


def test_trial_status_and_the_best_trial() -> None:
    assert end_status(error="ConfigError: bad", finished=False, epochs_run=0, max_epochs=4, stopper="ASHA") == (
        "failed", "ConfigError: bad")
    assert end_status(error="", finished=True, epochs_run=4, max_epochs=4, stopper="ASHA")[0] == "completed"
    assert end_status(error="", finished=True, epochs_run=2, max_epochs=4, stopper="ASHA")[0] == "early_stopped"
    assert end_status(error="", finished=False, epochs_run=1, max_epochs=4, stopper="ASHA") == (
        "stopped", "stopped by ASHA after epoch 1")
    rows = [
        TrialRow("a", {"adapter.r": 4}, [0.6, 0.7, 0.72], "completed"),
        TrialRow("b", {"adapter.r": 8}, [0.9], "stopped"),  # the highest, but stopped: no classifier to export
        TrialRow("c", {"adapter.r": 16}, [0.65, 0.74], "early_stopped"),
        TrialRow("d", {"adapter.r": 32}, [], "failed", error="boom"),
    ]
    best = best_trial(rows)
    assert best is not None and best.trial_id == "c" and best.best_epoch == 2
    csv_text = trials_csv(rows, ["adapter.r"])
    assert csv_text.splitlines()[0].startswith("trial_id,adapter.r,best_dev_auroc,best_epoch,epochs_run,status")
    assert "c,16,0.740000,2,2,early_stopped" in csv_text
    table = summary_table(rows, ["adapter.r"], best)
    assert table.splitlines()[2].startswith("| b |") and "| c **best** | 16 | 0.7400 | 2 | early_stopped |" in table


def test_asha_never_stops_a_trial_at_its_last_epoch() -> None:
    from ray.tune.schedulers import TrialScheduler

    from ray_med.tuning.sweep import LastEpochASHA

    class T:
        def __init__(self, trial_id: str) -> None:
            self.trial_id = trial_id

    sched = LastEpochASHA(last_epoch=2, grace_period=1, reduction_factor=2)
    sched.set_search_properties("dev_auroc", "max")
    a, b, c = T("a"), T("b"), T("c")
    for t in (a, b, c):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, a, {"training_iteration": 1, "dev_auroc": 0.8}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, b, {"training_iteration": 1, "dev_auroc": 0.5}) == TrialScheduler.STOP
    # At its last epoch a trial is about to write its classifier: never stopped there.
    assert sched.on_trial_result(None, c, {"training_iteration": 1, "dev_auroc": 0.9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, c, {"training_iteration": 2, "dev_auroc": 0.1}) == TrialScheduler.CONTINUE


@pytest.mark.parametrize("algorithm", ["tpe", "random"])
def test_the_searchers_propose_trial_configs_that_load(algorithm: str) -> None:
    """Optuna's TPE (list choices travel as YAML text) and Tune's random generator, with no cluster."""
    from ray_med.tuning.config import SweepConfig
    from ray_med.tuning.sweep import _search_space, _searcher

    params = parse_space({"train.lr": {"loguniform": [1e-4, 3e-3]}, "adapter.r": {"randint": [4, 8]},
                          "adapter.target_modules": {"choice": [["query", "value"], ["query", "key", "value"]]}})
    cfg = load_config(SweepConfig, None, [f"search.algorithm={algorithm}", "search.seed=3"])
    searcher = _searcher(cfg)
    space = _search_space(params, algorithm)
    data = base_data(FinetuneConfig, BASE, OVERRIDES)
    if algorithm == "tpe":
        assert searcher.set_search_properties("dev_auroc", "max", space)
        proposals = [searcher.suggest(f"t{i}") for i in range(4)]
    else:
        from ray.tune.search.variant_generator import generate_variants

        proposals = [{k: v for k, v in variant[1].items()} for variant in generate_variants(space)]
        proposals += [{k: v for k, v in variant[1].items()} for variant in generate_variants(space)]
    for sampled in proposals:
        trial = trial_config(FinetuneConfig, data, params, sampled)
        assert 1e-4 <= trial.train.lr <= 3e-3 and 4 <= trial.adapter.r <= 8
        assert trial.adapter.target_modules in (["query", "value"], ["query", "key", "value"])
