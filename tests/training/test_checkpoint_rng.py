"""A checkpoint carries every rank's random generators, so dropout after a resume is the uninterrupted run's."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import ray.train
import torch

from ray_med.training import worker
from ray_med.training.loop import LoopState


def test_a_resumed_rank_draws_what_it_would_have_drawn(tmp_path: Path, monkeypatch) -> None:
    checkpoints = worker.RayCheckpoints(rank=1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.rand(3)  # the generators have moved on by the time the checkpoint is taken
    with checkpoints.saver(lambda folder: None)(LoopState(step=4)) as checkpoint:
        shutil.copytree(checkpoint.path, tmp_path / "ckpt")
    expected = (torch.rand(5), np.random.rand(5), random.random())  # what the run draws next

    torch.manual_seed(123)  # a restarted process starts from other generators
    np.random.seed(123)
    random.seed(123)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["rng_rank1.pt"]
    (tmp_path / "ckpt" / worker.STATE_FILE).write_text('{"history": [], "state": {"step": 4}}')  # rank 0's part
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(tmp_path / "ckpt"))
    state = checkpoints.loader(lambda folder: None)()
    assert state is not None and state.step == 4
    drawn = (torch.rand(5), np.random.rand(5), random.random())
    torch.testing.assert_close(drawn[0], expected[0], rtol=0, atol=0)
    assert np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]
