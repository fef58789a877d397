"""Run records and the run index (no Ray): status, attempts, outputs, lineage, and what `jobs/runs.py` prints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ray_med import runs
from ray_med.config import from_dict
from ray_med.runtime import RunContext, RuntimeConfig, Storage


@dataclass
class Cfg:
    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    model_path: str | None = None
    lr: float = 1e-3


@dataclass
class Out:
    run_dir: str
    loss: float

    def headline(self) -> tuple[str, float]:
        return "loss", self.loss


def _start(storage: Storage, name: str, cfg: Cfg) -> tuple[RunContext, runs.RunRecord]:
    ctx = RunContext(job="pretrain", name=name, storage=storage)
    return ctx, runs.begin(ctx, cfg, overrides=["lr=0.01"])


def test_a_finished_run_records_its_outputs_headline_and_lineage(tmp_path: Path) -> None:
    storage = Storage.parse(str(tmp_path))
    ctx, record = _start(storage, "pretrain-a", Cfg())
    runs.end(ctx, record, outputs=Out(ctx.dir, 2.5))
    child_ctx, child = _start(storage, "finetune-b", Cfg(model_path=f"{tmp_path}/pretrain-a/model"))
    runs.end(child_ctx, child, outputs=Out(child_ctx.dir, 1.0))

    back = runs.read_record(storage, "pretrain-a")
    assert back.status == "finished" and back.headline == {"name": "loss", "value": 2.5}
    assert runs.outputs_of(back, Out) == Out(ctx.dir, 2.5)
    assert back.overrides == ["lr=0.01"] and len(back.attempts) == 1 and "ended" in back.attempts[0]
    assert runs.read_record(storage, "finetune-b").inputs == {"model_path": "pretrain-a"}

    rows = {r["run"]: r for r in runs.list_runs(from_dict(runs.RunsConfig, {"run": {"storage": str(tmp_path)}}))}
    assert set(rows) == {"pretrain-a", "finetune-b"}
    table = runs.format_runs(list(rows.values()))
    assert "| finetune-b | pretrain | finished |" in table and "loss 1 | pretrain-a |" in table


def test_status_tells_failed_resumable_running_and_interrupted(tmp_path: Path) -> None:
    storage = Storage.parse(str(tmp_path))
    failed_ctx, failed = _start(storage, "failed", Cfg())
    runs.end(failed_ctx, failed, error=ValueError("boom"))
    resumable_ctx, resumable = _start(storage, "resumable", Cfg())
    runs.end(resumable_ctx, resumable, error=KeyboardInterrupt())
    (tmp_path / "resumable" / "checkpoint_step0000050").mkdir()
    _start(storage, "running", Cfg())  # this process is alive
    gone_ctx, gone = _start(storage, "gone", Cfg())
    gone.attempts[-1]["pid"] = 2**22 + 12345  # a process that does not exist
    (tmp_path / "gone" / "run.json").write_text(json.dumps(runs.dataclasses.asdict(gone)))

    status = {r["run"]: r["status"] for r in runs.list_runs(from_dict(runs.RunsConfig,
                                                                      {"run": {"storage": str(tmp_path)}}))}
    assert status == {"failed": "failed", "resumable": "resumable", "running": "running", "gone": "interrupted"}
    assert runs.read_record(storage, "failed").attempts[-1]["error"] == "ValueError: boom"

    # A new attempt of the same run keeps the earlier ones.
    _, again = _start(storage, "failed", Cfg())
    assert len(again.attempts) == 2


def test_the_runs_job_prints_the_table_or_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = Storage.parse(str(tmp_path))
    ctx, record = _start(storage, "pretrain-a", Cfg())
    runs.end(ctx, record, outputs=Out(ctx.dir, 2.5))
    runs.run_index(from_dict(runs.RunsConfig, {"run": {"storage": str(tmp_path)}, "json": True}))
    row = json.loads(capsys.readouterr().out.strip())
    assert row["run"] == "pretrain-a" and row["status"] == "finished"
    runs.run_index(from_dict(runs.RunsConfig, {"run": {"storage": str(tmp_path / "empty")}}))
    assert "no runs under" in capsys.readouterr().out
