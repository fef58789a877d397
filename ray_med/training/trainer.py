"""The one place that turns config into a Ray Train trainer: scaling, run, failure and checkpoint settings.

Every Train job (pretraining, the domain adapter, the downstream classifier, and the
stages that build on them) calls :func:`build_trainer`, so they all get the same
behaviour: the run's name and storage from :mod:`ray_med.runtime` (a resubmitted run
resumes from its latest checkpoint), ``FailureConfig(max_failures)`` restarts, the
newest ``checkpoint.keep`` checkpoints kept, gloo on CPU and NCCL on GPU, and
``num_workers=0`` for Ray Train's in-process local mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

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


def build_trainer(
    worker: Callable[[dict[str, Any]], Any],
    worker_config: dict[str, Any],
    *,
    scaling: ScalingSettings,
    ctx: RunContext,
    threads: int,
    keep_checkpoints: int = 2,
    datasets: dict[str, Any] | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` running ``worker(worker_config)`` on ``scaling.num_workers`` workers."""
    resources = {"CPU": threads, **scaling.resources_per_worker}
    return TorchTrainer(
        worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=ctx.name,
            storage_path=ctx.storage.uri,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            # Ray Train's own INFO lines (every report with its metrics, every checkpoint,
            # the worker group's start) stay in its log files; the job prints its progress.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets or {},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
    )
