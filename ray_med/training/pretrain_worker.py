"""The Ray Train worker of continued pretraining (and of the domain adapter): DeepSpeed behind the shared loop.

Every worker builds the model (with a trainable adapter for the domain stage), wraps it
with ``deepspeed.initialize`` (which finds the process group Ray Train set up), and
hands :func:`~ray_med.training.loop.run_loop` one micro-batch step, its shard of the
``train`` dataset, the held-out evaluation, and DeepSpeed checkpoints inside Ray Train
checkpoints: every rank saves its shard to a local folder and reports it, and Ray
gathers the shards into one checkpoint in the run's storage. A restarted worker group
(after a failure, or a resubmitted job) loads the latest one, with the loop state (the
step, the epoch, the batches of the epoch already consumed), and skips those batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.registry import get_method
from ray_med.errors import ConfigError
from ray_med.evaluation.perplexity import lm_nll
from ray_med.models import build_or_load, count_parameters, save_pretrained
from ray_med.models.config import ModelConfig
from ray_med.runtime import Storage, localize, seed_everything
from ray_med.training.config import (
    CheckpointSettings,
    DeepSpeedSettings,
    EvalSettings,
    OptimConfig,
    TrainSettings,
)
from ray_med.training.deepspeed_config import deepspeed_config
from ray_med.training.loop import LoopSettings, LoopState, StepResult, run_loop
from ray_med.training.report import plot_losses
from ray_med.training.schedule import flops_per_token, lr_at
from ray_med.training.speed import compile_layers, fuse_lm_loss, resolve_fused_loss
from ray_med.training.worker import (
    RayCheckpoints,
    ensure_process_group,
    reduce_mean,
    say,
    test_fault,
    worker_info,
)

CKPT_TAG = "ds"

TIMINGS = ("time_to_first_step_s", "checkpoint_save_s")
"""Added to the last row of the history (metrics.json) and to the job's metrics: the seconds from the job's
start to this attempt's first optimizer step, and the seconds training waited on checkpoint saves."""


@dataclass
class WorkerSpec:
    """Everything a worker needs, sent once through ``train_loop_config``."""

    model: ModelConfig
    vocab_size: int
    train: TrainSettings
    optim: OptimConfig
    deepspeed: DeepSpeedSettings
    checkpoint: CheckpointSettings
    eval: EvalSettings
    use_gpu: bool
    threads: int
    seed: int
    run_name: str
    name: str = "pretrain"
    """Prefix of the progress lines ([pretrain], [domain])."""
    eval_blocks: dict[str, np.ndarray] = field(default_factory=dict)
    """Held-out packed sequences per source (small; they travel in the object store)."""
    export_dir: str | None = None
    """Where rank 0 writes the final HF model or adapter (a local path or URI)."""
    tokenizer: Any = None
    """Saved next to the exported model."""
    metrics_dir: str | None = None
    """Run folder for metrics.json and the loss plot."""
    adapter: AdapterConfig | None = None
    """Train only this adapter on the frozen model (stage-1 domain adaptation)."""
    started: float | None = None
    """When the job started (``time.time()`` on the driver), for ``time_to_first_step_s``."""


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on norms and biases (1-D tensors), as in Llama and Meditron training.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # An adapter may have no 1-D tensors at all (LoRA); DeepSpeed drops empty groups,
    # which would leave the LR scheduler with more groups than the optimizer.
    return [g for g in groups if g["params"]]


def pretrain_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train ``train_loop_per_worker``: ``config["spec"]`` is a :class:`WorkerSpec`.

    Returns the run's history (every logged step and evaluation); Ray Train hands rank
    0's to the driver as ``Result.return_value``.
    """
    spec: WorkerSpec = config["spec"]
    # DeepSpeed reads DS_ACCELERATOR when it is imported (otherwise it guesses, and says so).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.use_gpu else "cpu")
    # lazy: only workers run DeepSpeed; the driver and Ray Data's tasks import this module too
    import deepspeed

    info = worker_info()
    rank, world = info.rank, info.world
    local = ensure_process_group()
    if local:
        # DeepSpeed caches its world group per process. Ray Train's local mode destroys the
        # process group after each run, so a second local run in this process (the
        # pipeline's pretrain then domain stage) must not reuse the stale one.
        deepspeed.utils.groups._WORLD_GROUP = None
    torch.set_num_threads(spec.threads)
    seed_everything(spec.seed)
    device = torch.device("cuda", info.local_rank) if spec.use_gpu else torch.device("cpu")
    if spec.use_gpu:
        torch.cuda.set_device(device)

    t = spec.train
    # A model in remote storage is downloaded once per node (runtime.localize's cache).
    mcfg = dataclasses.replace(spec.model, path=localize(spec.model.path)) if spec.model.path else spec.model
    model = build_or_load(mcfg, vocab_size=spec.vocab_size)
    if spec.adapter is not None:
        # The method freezes the base; only the adapter reaches the optimizer.
        model = get_method(spec.adapter.method).inject(model, spec.adapter)
    # The input embedding is a lookup, not a matmul: it counts towards neither 6N nor 4N.
    embedding = model.get_input_embeddings().weight
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - (
        embedding.numel() if embedding.requires_grad else 0)
    n_frozen = count_parameters(model) - embedding.numel() - n_trainable
    ds = spec.deepspeed
    if world == 1 and ds.zero_stage > 0 and not (ds.offload_optimizer or ds.offload_params):
        # ZeRO partitions state across data-parallel ranks; with one rank there is nothing
        # to partition and stages 1-3 only add flat-buffer copies (5% of a tiny CPU step).
        ds = dataclasses.replace(ds, zero_stage=0)
    loss_kind = resolve_fused_loss(t.fused_loss, on_gpu=spec.use_gpu)
    if loss_kind is not None:
        if ds.zero_stage == 3:
            # ZeRO-3 gathers lm_head's weight only around lm_head's own forward, which the fused loss skips.
            raise ConfigError("train.fused_loss needs deepspeed.zero_stage 0-2 (ZeRO-3 partitions lm_head)")
        fuse_lm_loss(model, loss_kind)
    if t.activation_checkpointing:
        # Non-reentrant: no input needs requires_grad (a frozen base under an adapter), and it nests a compiled layer.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.compile:
        # In place, before DeepSpeed wraps the model: the engine, its checkpoints and the export see the same
        # modules and parameter names; compilation itself happens on the first forward.
        compile_layers(model)
    optimizer = torch.optim.AdamW(
        _param_groups(model, spec.optim.weight_decay), lr=spec.optim.lr, betas=spec.optim.betas,
        eps=spec.optim.eps, fused=spec.use_gpu,
    )
    peak = spec.optim.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_at(s, peak=peak, warmup_steps=spec.optim.warmup_steps, max_steps=t.max_steps,
                        min_lr_ratio=spec.optim.min_lr_ratio) / peak,
    )
    ds_cfg = deepspeed_config(
        ds, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
        # Stage 0 clips here instead (below), because DeepSpeed does not expose the norm
        # it computes for stage 0; stages 1-3 clip inside DeepSpeed and report it.
        grad_clip=spec.optim.grad_clip if ds.zero_stage > 0 else 0.0, on_gpu=spec.use_gpu,
    )
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_cfg)
    clip = spec.optim.grad_clip if spec.optim.grad_clip > 0 else float("inf")

    def step(batch: dict[str, torch.Tensor], boundary: bool) -> StepResult:
        ids = batch["input_ids"]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        norm = None
        if boundary and ds.zero_stage == 0:
            # Gradients are already all-reduced and averaged over micro-batches here.
            norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip)
        engine.step()
        if boundary and ds.zero_stage > 0:
            norm = engine.get_global_grad_norm()
        return StepResult(loss.detach(), ids.numel(), None if norm is None else float(norm),
                          float(scheduler.get_last_lr()[0]))

    shard = ray.train.get_dataset_shard("train")

    def batches(epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        it = shard.iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long, device=device,
                                      drop_last=True, prefetch_batches=2)
        for i, batch in enumerate(it):
            if i >= skip:  # the first `skip` were trained on before the checkpoint this run resumed from
                yield batch

    def evaluate() -> dict[str, float]:
        engine.eval()
        out: dict[str, float] = {}
        for name, blocks in spec.eval_blocks.items():
            # Every rank makes the same number of forwards (ZeRO-3 gathers weights in each).
            acc = lm_nll(lambda ids: engine(input_ids=ids), blocks, batch_size=t.micro_batch_size, device=device,
                         rank=rank, world=world)
            sums = torch.tensor([acc.total_nll, float(acc.tokens)], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(sums)
            loss = float(sums[0] / max(sums[1], 1))
            out[f"eval/{name}/loss"] = loss
            out[f"eval/{name}/perplexity"] = float(np.exp(min(loss, 700)))
        engine.train()
        return out

    def read(folder: Path) -> None:
        loaded, _ = engine.load_checkpoint(str(folder), tag=CKPT_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if loaded is None:  # DeepSpeed returns None rather than raising when it finds nothing to load
            raise RuntimeError(f"DeepSpeed found no checkpoint to resume from in {folder}")

    checkpoints = RayCheckpoints(rank, async_upload=spec.checkpoint.async_upload)
    checkpoints_loader = checkpoints.loader(read)

    def load() -> LoopState | None:
        state = checkpoints_loader()
        # The DeepSpeed shard and the loop state come from the same save: their steps agree,
        # or resuming would pair one step's weights with another step's data position.
        if state is not None and engine.global_steps != state.step:
            raise RuntimeError(f"checkpoint mismatch: DeepSpeed is at step {engine.global_steps}, "
                               f"the loop state at step {state.step}")
        return state

    settings = LoopSettings(
        name=spec.name, max_steps=t.max_steps, grad_accum=t.grad_accum, log_every=t.log_every,
        eval_every=spec.eval.every_steps if spec.eval_blocks else 0, eval_at_start=bool(spec.eval_blocks),
        report_every=t.report_every, checkpoint_every=spec.checkpoint.every_steps,
        flops_per_token=flops_per_token(n_trainable, model.config.num_hidden_layers, model.config.hidden_size,
                                        t.seq_len, n_frozen=n_frozen),
        peak_flops=t.peak_flops, world=world,
        # The stage really used (one worker runs stage 0), for the benchmark and the record.
        tags={"zero_stage": ds.zero_stage, "world": world},
    )
    timings: dict[str, float | None] = {"time_to_first_step_s": None, "checkpoint_save_s": 0.0}
    fault = test_fault(t.fail_at_step, spec.name, rank, world, hold=t.fail_mode == "hold")

    def on_step(state: LoopState) -> None:
        if timings["time_to_first_step_s"] is None:
            timings["time_to_first_step_s"] = time.time() - (spec.started or time.time())
        fault(state)

    engine.train()
    state = run_loop(
        settings, step=step, batches=batches, evaluate=evaluate if spec.eval_blocks else None,
        report=checkpoints.report,
        # Local mode keeps no checkpoints (Ray Train's local mode has no storage for them).
        save=None if local else _timed(checkpoints.saver(lambda folder: engine.save_checkpoint(str(folder), tag=CKPT_TAG)),
                                       timings),
        load=load, reduce_mean=reduce_mean(world), on_step=on_step, log=say if rank == 0 else lambda _: None,
    )
    if state.history:
        state.history[-1].update(timings)
    _export(engine, spec, ds.zero_stage, rank, state.history, deepspeed)
    return state.history


def _timed(save: Callable[[LoopState], contextlib.AbstractContextManager[Any]],
           timings: dict[str, float | None]) -> Callable[[LoopState], contextlib.AbstractContextManager[Any]]:
    """``save`` adding its seconds to ``timings["checkpoint_save_s"]``: the write, and the report inside it
    (with a synchronous upload, the copy to storage; with an asynchronous one, only the registration)."""

    @contextlib.contextmanager
    def timed(state: LoopState) -> Iterator[Any]:
        t0 = time.perf_counter()
        try:
            with save(state) as checkpoint:
                yield checkpoint
        finally:
            timings["checkpoint_save_s"] = (timings["checkpoint_save_s"] or 0.0) + time.perf_counter() - t0

    return timed


def _export(engine: Any, spec: WorkerSpec, zero_stage: int, rank: int, history: list[dict[str, Any]],
            deepspeed: Any) -> None:
    """Rank 0 writes the HF model (or the adapter), metrics.json and the loss plot (ZeRO-3 gathers first)."""
    params = list(engine.module.parameters())
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if rank == 0 and spec.export_dir:
            storage = Storage.parse(spec.export_dir)
            if spec.adapter is not None:
                # PEFT format (adapter_config.json + safetensors), next to its tokenizer.
                with storage.local_dir("adapter") as out:
                    engine.module.save_pretrained(str(out))
                    if spec.tokenizer is not None:
                        spec.tokenizer.save_pretrained(str(out))
            else:
                with storage.local_dir("model") as out:
                    save_pretrained(engine.module, out, tokenizer=spec.tokenizer)
    if rank == 0 and spec.metrics_dir:
        storage = Storage.parse(spec.metrics_dir)
        storage.write_text("metrics.json", json.dumps(history, indent=1) + "\n")
        with storage.local_dir("plots") as out:
            plot_losses(history, out / "loss.png")
