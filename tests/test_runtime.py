"""Runtime: storage roots, run names, run folders, seeding (no Ray here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ray_med.errors import ConfigError
from ray_med.pipeline.config import PipelineConfig
from ray_med.runtime import RuntimeConfig, Storage, run_name, seed_everything, start_run


def test_local_storage_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Storage.parse("runs")
    assert s.uri == str(tmp_path / "runs") and s.is_local
    assert s.join("a", "b.json") == str(tmp_path / "runs" / "a" / "b.json")


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://bucket/runs/", "file:///tmp/x", "abfs://c@acct/p"])
def test_uri_storage_is_accepted_without_touching_it(uri: str) -> None:
    s = Storage.parse(uri)
    assert not s.is_local
    assert s.join("run-1", "model") == uri.rstrip("/") + "/run-1/model"


@pytest.mark.parametrize("uri", ["ftp://host/x", "http://example.org/runs", ""])
def test_unsupported_storage_fails_clearly(uri: str) -> None:
    with pytest.raises(ConfigError, match="run.storage"):
        Storage.parse(uri)


def test_run_name_derives_from_job_and_config() -> None:
    a, b = PipelineConfig(), PipelineConfig()
    assert run_name("pipeline", a, a.run) == run_name("pipeline", b, b.run)
    assert run_name("pipeline", a, a.run).startswith("pipeline-")
    b.seq_len = 512
    assert run_name("pipeline", a, a.run) != run_name("pipeline", b, b.run)
    # Where the run is stored does not change which run it is.
    c = PipelineConfig()
    c.run.storage = "/elsewhere"
    assert run_name("pipeline", a, a.run) == run_name("pipeline", c, c.run)
    c.run.name = "mine"
    assert run_name("pipeline", c, c.run) == "mine"


def test_start_run_writes_config_locally(tmp_path: Path) -> None:
    cfg = PipelineConfig(run=RuntimeConfig(storage=str(tmp_path)))
    ctx = start_run("pipeline", cfg, cfg.run)
    assert Path(ctx.dir).parent == tmp_path
    assert "seq_len: 256" in Path(ctx.path("config.yaml")).read_text()
    # Resubmitting the same config lands in the same folder.
    assert start_run("pipeline", cfg, cfg.run).dir == ctx.dir


def test_uri_storage_writes_through_pyarrow(tmp_path: Path) -> None:
    storage = Storage.parse(f"file://{tmp_path}/store")
    target = storage.write_text("run/report.json", json.dumps({"ok": 1}))
    assert target.endswith("/store/run/report.json")
    assert json.loads((tmp_path / "store" / "run" / "report.json").read_text()) == {"ok": 1}
    with storage.local_dir("run/model") as d:
        (d / "weights.bin").write_bytes(b"abc")
        assert not (tmp_path / "store" / "run" / "model").exists()  # uploaded only on success
    assert (tmp_path / "store" / "run" / "model" / "weights.bin").read_bytes() == b"abc"
    with pytest.raises(RuntimeError), storage.local_dir("run/failed") as d:
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("step failed")
    assert not (tmp_path / "store" / "run" / "failed").exists()


def test_seed_everything_is_reproducible() -> None:
    seed_everything(3)
    a = torch.rand(4)
    seed_everything(3)
    assert torch.equal(a, torch.rand(4))


class _FakeRay:
    """Stands in for the ray module to check which cluster init_ray asks for, without starting one."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.calls: list[dict] = []
        self.data = SimpleNamespace(DataContext=SimpleNamespace(get_current=lambda: SimpleNamespace()))

    def is_initialized(self) -> bool:
        return bool(self.calls)

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)

    def cluster_resources(self) -> dict:
        return {"CPU": 2.0}


@pytest.mark.parametrize(
    ("env", "cfg_address", "expected"),
    [
        (None, None, {"address": "local"}),  # embedded, never a bare ray.init()
        ("ray://head:10001", None, {"address": "ray://head:10001"}),  # what `ray job submit` sets
        ("10.0.0.1:6379", "auto", {"address": "auto"}),  # the config wins over the environment
    ],
)
def test_init_ray_picks_the_cluster(monkeypatch: pytest.MonkeyPatch, env, cfg_address, expected) -> None:
    import sys

    import ray_med.runtime
    from ray_med.runtime import init_ray

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    monkeypatch.setattr(ray_med.runtime, "_embedded", False)  # the fake starts nothing
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert init_ray(RuntimeConfig(ray_address=cfg_address, num_cpus=3)) == {"CPU": 2.0}
    (call,) = fake.calls
    assert call["address"] == expected["address"]
    # Only the embedded Ray is sized by the config; a cluster has its own resources.
    assert call.get("num_cpus") == (3 if expected["address"] == "local" else None)
    init_ray(RuntimeConfig())  # already connected: no second init
    assert len(fake.calls) == 1
