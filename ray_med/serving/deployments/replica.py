"""What every model replica shares: one compute thread, a multiplexed adapter cache, dynamic batches, options.

A replica runs every forward on one dedicated thread: the event loop stays free to
accept and batch requests while a batch computes, and the adapter switch (global state
of the model) can never race a forward. The batch sizes and the adapter cache's size
come from the config at start-up (``serve.batch`` / ``serve.multiplexed`` applied to
instance methods, which Serve supports), so the deployment classes are module-level.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from ray_med.serving.config import DeploymentConfig, ServeAppConfig
from ray_med.serving.engines import set_threads


class ComputeThread:
    """One thread that runs a replica's model calls, with the intra-op thread count set in it."""

    def __init__(self, part: DeploymentConfig) -> None:
        threads = part.torch_threads or max(1, math.ceil(part.num_cpus))
        # The thread count must be set *in* the compute thread: OpenMP keeps it per
        # thread, and a new thread starts from OMP_NUM_THREADS, which Ray sets to the
        # actor's CPU count (1 for a fractional actor): measured 1.5x slower forwards.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=set_threads,
                                        initargs=(threads,))

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def run_cancellable(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, cancel=<Event>, **kwargs)``; the event is set when this call is cancelled.

        Serve cancels a request's coroutine (in this replica and in the ones it called)
        when the client disconnects or the request passes ``request_timeout_s``. A thread
        cannot be interrupted, so the work has to notice: generation checks the event
        between tokens. A call still queued behind another never starts.
        """
        cancel = threading.Event()
        try:
            return await self.run(fn, *args, cancel=cancel, **kwargs)
        except asyncio.CancelledError:
            cancel.set()
            raise


def adapter_cache(thread: ComputeThread, load: Callable[[str], None], unload: Callable[[str], None],
                  size: int) -> Callable[[str], Awaitable[Any]]:
    """A ``serve.multiplexed`` loader of ``size`` adapters: loads on the compute thread, unloads on eviction."""

    async def get(name: str) -> Any:
        await thread.run(load, name)

        class Loaded:
            def __repr__(self) -> str:
                return f"<adapter {name}>"

        ref = Loaded()

        async def release() -> None:
            await thread.run(unload, name)

        # An instance attribute, not a method: Serve awaits it on eviction, and garbage
        # collection never calls it (it looks __del__ up on the type).
        ref.__del__ = release
        return ref

    return serve.multiplexed(max_num_models_per_replica=size)(get)


def batched(fn: Callable[..., Awaitable[list[Any]]], part: DeploymentConfig) -> Callable[..., Awaitable[Any]]:
    """``fn`` behind ``serve.batch`` with the deployment's batch size, wait and batches in flight."""
    return serve.batch(max_batch_size=part.max_batch_size, batch_wait_timeout_s=part.batch_wait_timeout_s,
                       max_concurrent_batches=part.max_concurrent_batches)(fn)


def raise_if_error(value: Any) -> Any:
    """A batched call's per-item result, re-raised when it is an exception (batches return errors per item)."""
    if isinstance(value, BaseException):
        raise value
    return value


def options(part: DeploymentConfig, cfg: ServeAppConfig, *, hosts: DeploymentConfig | None = None) -> dict[str, Any]:
    """Deployment options; ``hosts``: the part whose model runs inside this deployment too."""
    cpus, gpus, env, resources = part.num_cpus, part.num_gpus, dict(part.env), dict(part.resources)
    if hosts is not None:
        cpus, gpus, env = max(cpus, hosts.num_cpus), max(gpus, hosts.num_gpus), {**env, **hosts.env}
        resources = {**hosts.resources, **resources}
    # Serve reads this flag when the replica process imports it: it must be in the env.
    env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "1" if part.user_code_thread else "0"
    opts: dict[str, Any] = {
        "max_ongoing_requests": part.max_ongoing_requests,
        "max_queued_requests": part.max_queued_requests,
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env},
                              **({"resources": resources} if resources else {})},
        # One access-log line per request per hop costs CPU on a small box; off by default.
        "logging_config": {"enable_access_log": cfg.access_log, "log_level": cfg.log_level},
    }
    if part.max_replicas_per_node:
        opts["max_replicas_per_node"] = part.max_replicas_per_node
    if part.max_replicas > part.min_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": part.min_replicas,
            "max_replicas": part.max_replicas,
            "target_ongoing_requests": part.target_ongoing_requests,
        }
    else:  # a fixed size: no autoscaling metrics pushed to the controller on every request
        opts["num_replicas"] = part.min_replicas
    return opts
