"""Shared test setup: offline hubs, one Ray auth mode, the shared data folder, one local Ray.

Unit tests never start Ray. Integration tests take the session-scoped ``ray_session``
fixture, so the cluster starts once (8-16 s on 2 cores) for the whole run.
"""

from __future__ import annotations

import os
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


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that start their own cluster (`submit`) run first, before the shared local Ray
    exists: on 2 cores the shared cluster's processes would otherwise slow them down."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("submit") else 1)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for every integration test."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
