"""Mistakes fail once, clearly: checked on the driver before any worker starts, or returned by a worker, not retried.

Each job case asserts the exit code 2, a one-line message naming the key, and that no
Train run started (no run folder holds a checkpoint or worker output). The last test
runs a real 2-worker group whose workers raise a user error and counts the attempts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ray_med.adapters.config import AdapterConfig
from ray_med.errors import ConfigError, DataError
from ray_med.models.config import ModelConfig
from ray_med.training.preflight import check_adapter, check_batches, meta_model

REPO = Path(__file__).resolve().parents[2]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    return err[-1]


# ----------------------------------------------------------------------- unit: no Ray


def test_target_modules_that_match_nothing_name_the_real_layers() -> None:
    model = meta_model(ModelConfig(preset="tiny-llama"), vocab_size=256)
    with pytest.raises(ConfigError, match=r"target_modules: query match no module.*q_proj"):
        check_adapter(model, AdapterConfig(target_modules=["query"]))
    check_adapter(meta_model(ModelConfig(preset="tiny-llama"), vocab_size=256), AdapterConfig())  # q/v fit


def test_a_classifier_cannot_carry_prompt_learning_but_a_domain_adapter_can() -> None:
    with pytest.raises(ConfigError, match=r"adapter.method=prefix: a classifier's adapter cannot be prompt"):
        check_adapter(meta_model(ModelConfig(preset="tiny-llama")), AdapterConfig(method="prefix"),
                      task_type=None, stage="downstream")
    check_adapter(meta_model(ModelConfig(preset="tiny-llama")), AdapterConfig(method="prefix"))


def test_m3oe_is_refused_by_finetune_stages_and_pointed_to_its_job() -> None:
    model = meta_model(ModelConfig(preset="tiny-llama"), vocab_size=256)
    with pytest.raises(ConfigError, match=r"^adapter.method=m3oe is trained by jobs/inject.py, not by finetune's "
                                          r"domain or downstream stages.*use lora, adaption_prompt, prefix"):
        check_adapter(model, AdapterConfig(method="m3oe"))
    with pytest.raises(ConfigError, match=r"trained by jobs/inject.py.*use lora, adaption_prompt here$"):
        check_adapter(model, AdapterConfig(method="m3oe"), task_type=None, stage="downstream")
    assert not any(type(m).__name__ == "M3OELinear" for m in model.modules())  # refused before injecting


def test_meta_model_of_a_real_size_preset_costs_no_memory() -> None:
    model = meta_model(ModelConfig(preset="llama2-7b"))
    assert all(p.device.type == "meta" for p in model.parameters())
    check_adapter(model, AdapterConfig())


def test_too_little_data_for_the_batch_and_workers() -> None:
    check_batches(32, batch_size=16, workers=2, what="the split", unit="items", fix="lower it")
    with pytest.raises(DataError, match=r"the split has 31 items, fewer than one batch of 16 for each of 2 "
                                        r"worker\(s\) \(32\); lower it"):
        check_batches(31, batch_size=16, workers=2, what="the split", unit="items", fix="lower it")


# ------------------------------------------------------------- jobs: exit 2, no workers


def test_downstream_prompt_learning_adapter_fails_before_any_worker(tmp_path, shared_data, capsys, job_main) -> None:
    code = job_main("finetune")([
        "--config", str(REPO / "jobs/configs/finetune/pubmedqa_minilm_lora.yaml"), f"data.root={shared_data}",
        f"run.storage={tmp_path}/runs", "adapter.method=prefix", "scaling.num_workers=2",
    ])
    assert code == 2
    assert "adapter.method=prefix" in _one_line_error(capsys)
    assert not list((tmp_path / "runs").glob("*/checkpoint_*"))


def test_downstream_target_modules_and_batch_size_fail_before_any_worker(tmp_path, shared_data, capsys, job_main) -> None:
    base = ["--config", str(REPO / "jobs/configs/finetune/pubmedqa_minilm_lora.yaml"), f"data.root={shared_data}",
            f"run.storage={tmp_path}/runs", "scaling.num_workers=2"]
    # MiniLM (BERT) names its attention projections query/value, not Llama's q_proj/v_proj.
    assert job_main("finetune")([*base, "adapter.target_modules=[q_proj,v_proj]"]) == 2
    line = _one_line_error(capsys)
    assert "adapter.target_modules: q_proj, v_proj match no module" in line and "query" in line
    assert job_main("finetune")([*base, "train.batch_size=4096"]) == 2
    assert "fewer than one batch of 4096 for each of 2 worker(s)" in _one_line_error(capsys)


def test_domain_target_modules_fail_before_reading_the_corpus(tmp_path, shared_data, capsys, job_main) -> None:
    code = job_main("finetune")([
        "--config", str(REPO / "jobs/configs/finetune/tiny_domain.yaml"), f"corpus.root={shared_data}",
        f"run.storage={tmp_path}/runs", "adapter.target_modules=[query]",
    ])
    assert code == 2
    assert "adapter.target_modules: query match no module" in _one_line_error(capsys)


def test_domain_and_downstream_m3oe_fail_before_any_worker(tmp_path, shared_data, capsys, job_main) -> None:
    code = job_main("finetune")([
        "--config", str(REPO / "jobs/configs/finetune/tiny_domain.yaml"), f"corpus.root={shared_data}",
        f"run.storage={tmp_path}/runs", "adapter.method=m3oe",
    ])
    assert code == 2
    assert "adapter.method=m3oe is trained by jobs/inject.py" in _one_line_error(capsys)
    code = job_main("finetune")([
        "--config", str(REPO / "jobs/configs/finetune/pubmedqa_minilm_lora.yaml"), f"data.root={shared_data}",
        f"run.storage={tmp_path}/runs", "adapter.method=m3oe", "scaling.num_workers=2",
    ])
    assert code == 2
    assert "adapter.method=m3oe is trained by jobs/inject.py" in _one_line_error(capsys)
    assert not list((tmp_path / "runs").glob("*/checkpoint_*"))


@pytest.mark.ray
def test_pretrain_micro_batch_larger_than_the_data_fails_before_any_worker(
        ray_session, tmp_path, shared_data, capsys, job_main) -> None:
    code = job_main("pretrain")([
        "--config", str(REPO / "jobs/configs/pretrain/tiny.yaml"), f"corpus.root={shared_data}",
        f"run.storage={tmp_path}/runs", "train.micro_batch_size=100000", "scaling.num_workers=2",
    ])
    assert code == 2
    assert "the training mixture has" in _one_line_error(capsys)
    assert not list((tmp_path / "runs").glob("*/checkpoint_*"))


# ------------------------------------------------- worker side: returned, not retried


def _worker_with_a_user_error(config: dict) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with open(Path(config["attempts"]) / f"rank{rank}", "a") as f:
        f.write("attempt\n")
    raise DataError(f"shard of rank {rank} is malformed")


@pytest.mark.ray
def test_a_user_error_on_the_workers_fails_on_the_first_attempt(ray_session, tmp_path) -> None:
    import ray.cloudpickle

    from ray_med.runtime import RuntimeConfig, start_run
    from ray_med.training.config import ScalingSettings
    from ray_med.training.trainer import build_trainer, fit

    # The workers cannot import this test module by name; ship the worker function by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    scaling = ScalingSettings(num_workers=2, max_failures=3)
    ctx = start_run("preflight", scaling, RuntimeConfig(storage=str(tmp_path / "runs"), name="user-error"))
    trainer = build_trainer(_worker_with_a_user_error, {"attempts": str(tmp_path)}, scaling=scaling, ctx=ctx,
                            threads=1)
    with pytest.raises(DataError, match=r"^shard of rank 0 is malformed$"):
        fit(trainer)
    # max_failures=3 would have started the group 4 times had the error been raised.
    assert (tmp_path / "rank0").read_text() == "attempt\n"
    assert (tmp_path / "rank1").read_text() == "attempt\n"
