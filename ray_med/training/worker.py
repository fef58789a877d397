"""What every Ray Train worker shell needs: its rank, a process group, and the loop's Ray callables.

The training loop (:mod:`ray_med.training.loop`) knows nothing of Ray; a worker function
hands it the callables built here: ``report`` is ``ray.train.report`` (a barrier: every
rank calls it at the same steps), :class:`RayCheckpoints` turns a save into a Ray Train
checkpoint and opens the one a restarted or resubmitted run resumes from,
``reduce_mean`` averages a number over the ranks, and ``test_fault`` is the test-only
worker kill of ``fail_at_step``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from ray_med.training.loop import LoopState

STATE_FILE = "train_state.json"
RNG_FILE = "rng_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """This process's random generators: torch (CPU and every GPU), numpy and Python's."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(saved: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned, so dropout and sampling continue as if never stopped."""
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    np.random.set_state(saved["numpy"])
    random.setstate(saved["python"])


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world: int
    local_rank: int


def worker_info() -> WorkerInfo:
    """This worker's rank, the world size and its local rank (0, 1, 0 in local mode).

    Also puts the worker's root logger back at WARNING: Ray Train sets it to INFO, and
    one of Train's own loggers (named after its file, so outside the ``ray.train`` log
    level the trainer sets) then prints every report with all its metrics. The job
    prints its progress itself (:func:`say`).
    """
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    return WorkerInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())


def ensure_process_group() -> bool:
    """A one-process gloo group when Ray Train made none (local mode), for code that needs one (DeepSpeed).

    DeepSpeed also reads the launcher's variables (``LOCAL_RANK``, ...), which Ray Train's
    workers have and a local-mode run does not. True when it made the group (local mode).
    """
    if dist.is_initialized():
        return False
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def say(message: str) -> None:
    """One progress line on the worker's stdout (Ray forwards it to the driver and the job logs).

    Not ``print``: Ray Train patches ``print`` on its workers to go through its logger,
    which writes each line to the driver twice.
    """
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def reduce_mean(world: int) -> Callable[[float], float]:
    """Average a number over the ranks (every rank must call it at the same point)."""
    if world == 1:
        return float

    def mean(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / world

    return mean


def test_fault(fail_at_step: int | None, name: str, rank: int, world: int, *,
               hold: bool = False) -> Callable[[LoopState], None]:
    """The loop's ``on_step`` for the test-only fault: rank 1 (0 alone) fails, once per run, at that step.

    ``os._exit`` ends the worker process as a crash would (no cleanup, no exception for
    Ray Train to see); a marker file named after the run stops the restarted group from
    failing again. With ``hold`` the rank writes its node's ID into the marker and waits
    instead, for a test to remove that node (a lost machine, not just a lost process);
    if nobody does within 5 minutes it exits as above.
    """

    def on_step(state: LoopState) -> None:
        if fail_at_step is None or state.step != fail_at_step or rank != (1 if world > 1 else 0):
            return
        marker = Path(tempfile.gettempdir()) / f"ray_med-failed-{ray.train.get_context().get_experiment_name()}"
        if marker.exists():
            return
        if hold:
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(f"{state.step} {ray.get_runtime_context().get_node_id()}")
            tmp.replace(marker)  # whole, so the test never reads half a node ID
            say(f"[{name}] test fault: rank {rank} holds at step {state.step} for its node to go")
            time.sleep(300)
        else:
            marker.write_text(str(state.step))
            say(f"[{name}] test fault: rank {rank} exits at step {state.step}")
        os._exit(1)

    return on_step


def report(metrics: dict[str, Any], checkpoint: Any = None, *, async_upload: bool = False) -> None:
    """``ray.train.report``, naming a checkpoint folder after its step.

    With ``async_upload`` Ray Train copies the checkpoint to the run's storage in a
    background thread and deletes the local folder afterwards; the report returns once
    the checkpoint is registered, not uploaded.
    """
    name = f"checkpoint_step{int(metrics.get('step', 0)):07d}" if checkpoint is not None else None
    if async_upload and checkpoint is not None:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    else:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class RayCheckpoints:
    """Checkpoints as Ray Train checkpoints, for the loop's ``save`` and ``load``.

    ``saver(write)`` calls ``write(folder)`` on every rank, adds the loop state from rank
    0 and every rank's random generators, and yields a Ray checkpoint for ``report``;
    ``loader(read)`` opens the checkpoint a restarted or resubmitted run resumes from,
    calls ``read(folder)``, restores this rank's generators and returns the loop state
    (None for a fresh start). With the generators restored, dropout masks after a resume
    are the ones the uninterrupted run drew (a run resumed on another number of workers
    keeps its fresh generators where a rank has none saved).
    """

    def __init__(self, rank: int, *, async_upload: bool = False) -> None:
        self.rank = rank
        self.async_upload = async_upload
        """Upload in the background (``report``); the local folder then outlives ``save`` and Ray deletes it."""

    def _write(self, tmp: str, write: Callable[[Path], None], state: LoopState) -> None:
        write(Path(tmp))
        torch.save(rng_state(), Path(tmp) / RNG_FILE.format(rank=self.rank))
        if self.rank == 0:
            data = state.to_dict()
            (Path(tmp) / STATE_FILE).write_text(json.dumps({"history": data.pop("history"), "state": data}))

    def saver(self, write: Callable[[Path], None]) -> Callable[[LoopState], Any]:
        @contextlib.contextmanager
        def save(state: LoopState) -> Iterator[Any]:
            if self.async_upload:
                # Ray Train reads the folder after report returns, and deletes it once uploaded.
                tmp = tempfile.mkdtemp(prefix="ray_med-ckpt-")
                try:
                    self._write(tmp, write, state)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                yield ray.train.Checkpoint.from_directory(tmp)
                return
            with tempfile.TemporaryDirectory() as tmp:
                self._write(tmp, write, state)
                yield ray.train.Checkpoint.from_directory(tmp)

        return save

    def loader(self, read: Callable[[Path], None]) -> Callable[[], LoopState | None]:
        def load() -> LoopState | None:
            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                return None
            with checkpoint.as_directory() as d:
                read(Path(d))
                rng = Path(d) / RNG_FILE.format(rank=self.rank)
                if rng.is_file():  # our own file: numpy's and Python's states are not plain tensors
                    set_rng_state(torch.load(rng, weights_only=False))
                saved = json.loads((Path(d) / STATE_FILE).read_text())
                return LoopState.from_dict({**saved["state"], "history": saved["history"]})

        return load

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        report(metrics, checkpoint, async_upload=self.async_upload)
