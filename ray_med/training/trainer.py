"""The one place that turns config into a Ray Train trainer: scaling, run, failure and checkpoint settings.

Every Train job (pretraining, the domain adapter, the downstream classifier, and the
stages that build on them) calls :func:`build_trainer`, so they all get the same
behaviour: the run's name and storage from :mod:`ray_med.runtime` (a resubmitted run
resumes from its latest checkpoint), ``FailureConfig(max_failures)`` restarts, the
newest ``checkpoint.keep`` checkpoints kept, gloo on CPU and NCCL on GPU, and
``num_workers=0`` for Ray Train's in-process local mode.

A user's mistake that only a worker can see (a :class:`~ray_med.errors.RayMedError`
raised inside the worker function) must not be retried ``max_failures`` times and then
surface as a Ray traceback: :func:`build_trainer` wraps every worker so such an error is
*returned* as a :class:`UserFailure` (Ray Train retries only what a worker raises), and
:func:`fit` raises it again on the driver, where the job prints it as one line and
exits 2. This relies on such errors being the same on every rank, which they are:
they come from the config and the data, and every rank builds the same model and sees
the same data sizes before its first collective call. What can be checked before any
worker starts is checked by :mod:`ray_med.training.preflight`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ray_med import errors
from ray_med.runtime import RunContext
from ray_med.training.config import ScalingSettings


def threads_per_worker(s: ScalingSettings) -> int:
    """CPUs (and torch threads) per worker: the config's, 4 on GPU, else this cluster's CPUs shared out."""
    if s.cpus_per_worker:
        return s.cpus_per_worker
    if s.use_gpu:
        return 4
    cpus = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
    return max(1, int(cpus or os.cpu_count() or 1) // max(1, s.num_workers))


@dataclass(frozen=True)
class UserFailure:
    """What a worker returns instead of raising a user error: the error's type name, its message and the rank."""

    kind: str
    message: str
    rank: int


def fail_once(worker: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """``worker`` with user errors returned as a :class:`UserFailure` rather than raised (so not retried)."""

    @functools.wraps(worker)
    def run(config: dict[str, Any]) -> Any:
        try:
            return worker(config)
        except errors.RayMedError as exc:
            return UserFailure(type(exc).__name__, str(exc), ray.train.get_context().get_world_rank())

    return run


def fit(trainer: TorchTrainer) -> Any:
    """``trainer.fit()``, raising on the driver the user error a worker returned (the Result otherwise)."""
    result = trainer.fit()
    failure = result.return_value
    if isinstance(failure, UserFailure):
        kind = getattr(errors, failure.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, errors.RayMedError)):
            kind = errors.RayMedError
        raise kind(failure.message)
    return result


def _ordered_ingest() -> DataConfig:
    """Train's default ingest, with each shard's batches in the dataset's order.

    Without ``preserve_order`` Ray Data hands a shard its blocks as they become ready, so
    two runs with the same seed (or a run and its restart) train on different batches and
    skipping the consumed batches on resume would not land where the run stopped.
    """
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def build_trainer(
    worker: Callable[[dict[str, Any]], Any],
    worker_config: dict[str, Any],
    *,
    scaling: ScalingSettings,
    ctx: RunContext,
    threads: int,
    keep_checkpoints: int = 2,
    datasets: dict[str, Any] | None = None,
    name: str | None = None,
    callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` running ``worker(worker_config)`` on ``scaling.num_workers`` workers.

    Run it with :func:`fit`, which turns a worker's user error into the driver's. ``name``
    (default: the run's) names Ray Train's run: a second fit under the same name resumes
    from the first's last checkpoint, so a job that fits several times names each.
    ``callbacks`` are Ray Train callbacks (a sweep's trial passes Tune's ``TuneReportCallback``).
    """
    resources = {"CPU": threads, **scaling.resources_per_worker}
    return TorchTrainer(
        fail_once(worker),
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name or ctx.name,
            storage_path=ctx.storage.uri,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            # Ray Train's own INFO lines (every report with its metrics, every checkpoint,
            # the worker group's start) stay in its log files; the job prints its progress.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
        datasets=datasets or {},
        dataset_config=_ordered_ingest(),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
    )
