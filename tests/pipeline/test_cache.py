"""Stage keys (pure): a changed stage changes its key and the keys after it, never the ones before."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from ray_med.pipeline.cache import reusable, stage_key
from ray_med.runs import RunRecord
from ray_med.runtime import RuntimeConfig


@dataclass
class Cfg:
    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    lr: float = 1e-3
    epochs: int = 1


def _chain(cfgs: dict[str, Cfg]) -> dict[str, str]:
    """Keys of a linear pipeline a -> b -> c, as the runner computes them."""
    keys: dict[str, str] = {}
    previous: dict[str, str] = {}
    for name, cfg in cfgs.items():
        keys[name] = stage_key("job", cfg, previous)
        previous = {name: keys[name]}
    return keys


def test_a_changed_stage_reruns_itself_and_what_follows_only() -> None:
    base = {"a": Cfg(), "b": Cfg(), "c": Cfg()}
    keys = _chain(base)
    assert _chain({"a": Cfg(), "b": Cfg(), "c": Cfg()}) == keys  # stable
    changed = _chain({**base, "b": Cfg(epochs=2)})
    assert changed["a"] == keys["a"]
    assert changed["b"] != keys["b"] and changed["c"] != keys["c"]  # c's config is the same; its input is not


def test_the_run_section_is_not_part_of_the_key() -> None:
    cfg = Cfg()
    moved = replace(cfg, run=RuntimeConfig(storage="s3://bucket/runs", seed=0, num_cpus=8))
    assert stage_key("job", cfg, {}) == stage_key("job", moved, {})
    assert stage_key("job", cfg, {}) != stage_key("other", cfg, {})


def test_only_a_finished_run_with_the_same_key_is_reused() -> None:
    done = RunRecord(job="job", name="job-1", config_hash="1", status="finished", outputs={}, stage_key="k")
    assert reusable(done, "k")
    assert not reusable(done, "other")
    assert not reusable(replace(done, status="failed"), "k")
    assert not reusable(replace(done, outputs=None), "k")
    assert not reusable(None, "k")


@pytest.mark.parametrize("kind", ["local", "file"])
def test_a_finished_stage_whose_output_was_not_committed_is_redone(kind: str, tmp_path, capsys) -> None:
    """The run record says finished, but the model folder's save never completed: the stage runs again."""
    from ray_med.config import to_dict
    from ray_med.pipeline.run import reused
    from ray_med.pipeline.stages import STAGES
    from ray_med.registry import get_job
    from ray_med.runtime import MARKER, Storage
    from ray_med.training.config import PretrainOutputs

    storage = Storage.parse(str(tmp_path) if kind == "local" else f"file://{tmp_path}")
    stage, job = next(s for s in STAGES if s.name == "pretrain"), get_job("pretrain")
    outputs = PretrainOutputs(run_dir=storage.join("pretrain-1"), model_dir=storage.join("pretrain-1", "model"),
                              metrics={}, checkpoint=None, history=[])
    record = RunRecord(job="pretrain", name="pretrain-1", config_hash="1", status="finished",
                       outputs=to_dict(outputs), stage_key="k")
    assert reused(stage, job, record, "k") is None  # never written
    assert "rerun: " in capsys.readouterr().out
    with pytest.raises(RuntimeError), storage.local_dir("pretrain-1/model") as d:
        (d / "config.json").write_text("{}")
        raise RuntimeError("killed while saving the weights")
    assert reused(stage, job, record, "k") is None  # half-written: redone
    with storage.local_dir("pretrain-1/model") as d:
        (d / "config.json").write_text("{}")
    assert reused(stage, job, record, "k").model_dir == outputs.model_dir
    if kind == "file":  # a remote folder that lost its commit marker is not reused either
        (tmp_path / "pretrain-1" / "model" / MARKER).unlink()
        assert reused(stage, job, record, "k") is None
