"""The one training loop: steps, accumulation, evaluation, early stopping, logging, checkpoint state. No Ray.

Every trainer in ray_med (continued pretraining, the domain adapter, the downstream
classifier, and the stages that come after them) runs :func:`run_loop`. The loop owns
*when* things happen; the caller owns *how*, through a few callables:

* ``step(batch, boundary)`` runs one micro-batch (forward, backward, and the optimizer
  step when ``boundary`` is true) and returns a :class:`StepResult`: a DeepSpeed engine,
  a DDP model or a plain module all fit behind it;
* ``batches(epoch, skip)`` yields one epoch's micro-batches, leaving out the first
  ``skip`` (already trained on before the checkpoint the run resumed from);
* ``evaluate()`` returns metrics (identical on every rank: they decide early stopping);
* ``report(metrics, checkpoint)`` publishes metrics (and a checkpoint) to whoever runs
  the loop: Ray Train's ``ray.train.report`` on a worker, a list in a test;
* ``save(state)`` is a context manager that writes a checkpoint of the model, the
  optimizer and ``state`` and yields the object ``report`` takes; ``load()`` restores
  the latest one and returns its :class:`LoopState` (None for a fresh start).

Everything that decides what happens next (the step, the epoch, the batches consumed in
the epoch, the best metric so far) is in :class:`LoopState`, which is JSON and travels
inside every checkpoint, so a restarted run continues exactly where it stopped.

Collectives: with several data-parallel ranks, every rank must make the same calls in
the same order. The loop guarantees its part: ``reduce_mean``, ``report`` and ``save``
are called at the same steps on every rank, as long as every rank's ``batches`` yields
the same number of micro-batches. The callers' rule (README, "Uneven data"): training
shards drop the remainder, so every rank gets ``n // world`` items of each epoch's
permutation (at most ``world - 1`` items wait for the next epoch's order); evaluation
pads every rank to the same number of batches with forwards whose output is not
counted, so every held-out item counts exactly once.

Throughput: ``tokens_per_s`` in a logged row is the tokens of the steps since the
previous row over the training time they took; evaluation, reports and checkpoints in
between are paused out of the window, whichever steps they fall on.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ray_med.errors import DataError
from ray_med.training.schedule import mfu


@dataclass
class LoopSettings:
    """When the loop stops, logs, evaluates, reports and checkpoints."""

    name: str = "train"
    """Prefix of progress lines, e.g. [pretrain]."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: after ``epochs``)."""
    epochs: int | None = None
    """Stop after this many passes over the data (None: after ``max_steps``)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    log_every: int = 1
    """Log a row (loss, lr, grad norm, throughput) every N steps; 0: only with the last step."""
    eval_every: int = 0
    """Evaluate every N steps (and after the last); 0: never mid-epoch."""
    eval_at_start: bool = False
    """Evaluate before the first step (a fresh run only)."""
    report_every: int = 0
    """Report the latest row every N steps; 0: never mid-epoch."""
    checkpoint_every: int = 0
    """Checkpoint (and report) every N steps and after the last; 0: never mid-epoch."""
    per_epoch: bool = False
    """At every epoch end: evaluate, report the epoch's row, and checkpoint."""
    monitor: str | None = None
    """Evaluation metric that tracks the best state (higher is better), e.g. dev_auroc."""
    patience: int | None = None
    """Stop after this many evaluations without a better ``monitor``."""
    keep_best: bool = False
    """Restore the best evaluation's weights at the end (``restore_best``)."""
    total_steps: int | None = None
    """Shown in progress lines when the run is epoch-based."""
    flops_per_token: float = 0.0
    """Training FLOPs per token per rank, for MFU."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device; 0 leaves MFU out."""
    world: int = 1
    """Data-parallel ranks (throughput is summed over them)."""
    tags: dict[str, Any] = field(default_factory=dict)
    """Constant facts added to every logged row (e.g. the ZeRO stage really used)."""


@dataclass
class LoopState:
    """Where a run is: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already trained on."""
    micro: int = 0
    """Micro-batches since the last optimizer step (gradient accumulation spans epoch ends)."""
    tokens: int = 0
    """Tokens trained on, over all ranks."""
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    since_best: int = 0
    stopped_early: bool = False
    finished: bool = False
    """Set when the loop returns (never inside a checkpoint: a longer rerun continues from it)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        return cls(**data)


@dataclass
class StepResult:
    """One micro-batch: its loss (a tensor or float), the tokens it held, and the grad norm at a boundary."""

    loss: Any
    tokens: int
    grad_norm: float | None = None
    lr: float | None = None
    samples: int = 0
    """Examples in the micro-batch, for samples/s (0: not counted)."""


class Checkpointer(Protocol):
    """Where a shell keeps checkpoints (Ray Train's, on a worker): the loop's ``save``, ``load`` and ``report``.

    ``saver(write)`` makes a ``save`` that calls ``write(folder)`` with the model's and
    optimizer's files and adds the loop state; ``loader(read)`` makes a ``load`` that
    calls ``read(folder)`` on the checkpoint to resume from.
    """

    def saver(self, write: Callable[[Path], None]) -> Callable[[LoopState], contextlib.AbstractContextManager[Any]]:
        ...

    def loader(self, read: Callable[[Path], None]) -> Callable[[], LoopState | None]:
        ...

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        ...


def _noop(*_: Any, **__: Any) -> None:
    return None


@contextlib.contextmanager
def _no_checkpoint(_: LoopState) -> Iterator[None]:
    yield None


class _Window:
    """Throughput over the training time since the last row: evaluation, reports and checkpoints excluded."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.tokens, self.samples, self.seconds, self._t0 = 0, 0, 0.0, clock()
        self.samples_per_s = 0.0

    def resume(self) -> None:
        self._t0 = self._clock()

    def pause(self) -> None:
        self.seconds += self._clock() - self._t0

    def take(self) -> float:
        """Tokens/s of the window, then start a new one."""
        self.pause()
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        self.samples_per_s = self.samples / self.seconds if self.seconds > 0 else 0.0
        self.tokens, self.samples, self.seconds = 0, 0, 0.0
        self.resume()
        return rate


def run_loop(
    settings: LoopSettings,
    *,
    step: Callable[[Any, bool], StepResult],
    batches: Callable[[int, int], Iterable[Any]],
    evaluate: Callable[[], dict[str, float]] | None = None,
    report: Callable[[dict[str, Any], Any], None] = _noop,
    save: Callable[[LoopState], contextlib.AbstractContextManager[Any]] | None = None,
    load: Callable[[], LoopState | None] = _noop,
    reduce_mean: Callable[[float], float] = float,
    on_best: Callable[[], None] = _noop,
    restore_best: Callable[[], None] = _noop,
    on_step: Callable[[LoopState], None] = _noop,
    log: Callable[[str], None] = _noop,
    clock: Callable[[], float] = time.perf_counter,
) -> LoopState:
    """Train until ``max_steps`` or ``epochs`` (or early stopping); return the final state.

    ``clock`` times the throughput window and the epochs (a test passes a fake one).
    """
    s = settings
    if s.max_steps is None and s.epochs is None:
        raise ValueError("the loop needs max_steps or epochs")
    state = load() or LoopState()
    if state.step:
        log(f"[{s.name}] resumed from step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch} "
            "of the epoch)")
    save_cm = save or _no_checkpoint
    if evaluate is not None and s.eval_at_start and state.step == 0 and not state.history:
        state.history.append({"step": 0, **_evaluate(evaluate, s, state, log)})

    window = _Window(clock)
    row: dict[str, Any] = {}

    def checkpoint(metrics: dict[str, Any]) -> None:
        window.pause()
        with save_cm(state) as ckpt:
            report(metrics, ckpt)
        window.resume()

    def steps_done() -> bool:
        return s.max_steps is not None and state.step >= s.max_steps

    def epochs_done() -> bool:
        return s.epochs is not None and state.epoch >= s.epochs

    while not (steps_done() or epochs_done() or state.stopped_early):
        seen, epoch_losses, t_epoch = 0, [], clock()
        for batch in batches(state.epoch, state.batches_in_epoch):
            state.micro += 1
            boundary = state.micro == s.grad_accum
            res = step(batch, boundary)
            seen += 1
            state.batches_in_epoch += 1
            state.tokens += res.tokens * s.world
            window.tokens += res.tokens * s.world
            window.samples += res.samples * s.world
            epoch_losses.append(float(res.loss))
            if not boundary:
                continue
            state.micro = 0
            state.step += 1
            on_step(state)
            last = steps_done()
            if (s.log_every and state.step % s.log_every == 0) or last:
                row = _row(s, state, res, reduce_mean(float(res.loss)), window.take())
                if res.samples:
                    row["samples_per_s"] = window.samples_per_s
                state.history.append(row)
                log(_progress(s, row))
            if evaluate is not None and s.eval_every and (state.step % s.eval_every == 0 or last):
                window.pause()
                metrics = _evaluate(evaluate, s, state, log)
                window.resume()
                state.history.append({"step": state.step, **metrics})
                row = {**row, **metrics}
                _track_best(s, state, metrics, on_best)
            if s.checkpoint_every and (state.step % s.checkpoint_every == 0 or last):
                checkpoint({**row, "step": state.step})
            elif s.report_every and state.step % s.report_every == 0:
                window.pause()
                report({**row, "step": state.step}, None)
                window.resume()
            if last or state.stopped_early:
                break
        if seen == 0 and state.batches_in_epoch == 0:
            raise DataError(f"[{s.name}] the training data yielded no full batch; lower the batch size")
        if steps_done() or state.stopped_early:
            break
        # The epoch is complete.
        state.epoch += 1
        state.batches_in_epoch = 0
        if s.per_epoch:
            epoch_row: dict[str, Any] = {"epoch": state.epoch, "step": state.step,
                                         "train_loss": reduce_mean(sum(epoch_losses) / max(len(epoch_losses), 1))}
            if evaluate is not None:
                window.pause()
                metrics = evaluate()
                window.resume()
                epoch_row.update(metrics)
                _track_best(s, state, metrics, on_best)
            epoch_row["epoch_s"] = clock() - t_epoch
            state.history.append(epoch_row)
            log(_epoch_progress(s, epoch_row))
            checkpoint(epoch_row)
    state.finished = True
    if s.keep_best and state.best_step is not None:
        restore_best()
    return state


def _evaluate(evaluate: Callable[[], dict[str, float]], s: LoopSettings, state: LoopState,
              log: Callable[[str], None]) -> dict[str, float]:
    metrics = evaluate()
    log(f"[{s.name}] eval " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics


def _track_best(s: LoopSettings, state: LoopState, metrics: dict[str, float], on_best: Callable[[], None]) -> None:
    if s.monitor is None:
        return
    value = metrics.get(s.monitor)
    if value is None or not math.isfinite(value):
        value = -math.inf
    if state.best is None or value > state.best:
        state.best, state.best_step, state.best_epoch, state.since_best = value, state.step, state.epoch, 0
        on_best()
        return
    state.since_best += 1
    if s.patience is not None and state.since_best >= s.patience:
        state.stopped_early = True


def _row(s: LoopSettings, state: LoopState, res: StepResult, loss: float, tokens_per_s: float) -> dict[str, Any]:
    return {
        "step": state.step,
        "loss": loss,
        "lr": float(res.lr) if res.lr is not None else float("nan"),
        "grad_norm": float(res.grad_norm) if res.grad_norm is not None else float("nan"),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s / s.world, s.flops_per_token, s.peak_flops),
        "tokens": state.tokens,
        "epoch": state.epoch,
        "time": time.time(),
        **s.tags,
    }


def _progress(s: LoopSettings, row: dict[str, Any]) -> str:
    total = s.max_steps or s.total_steps
    line = (f"[{s.name}] step {row['step']}{f'/{total}' if total else ''} loss {row['loss']:.4f} "
            f"lr {row['lr']:.2e} grad_norm {row['grad_norm']:.3f} tok/s {row['tokens_per_s']:,.0f}")
    if s.peak_flops > 0:
        line += f" mfu {row['mfu']:.1%}"
    return line


def _epoch_progress(s: LoopSettings, row: dict[str, Any]) -> str:
    skip = {"epoch", "step", "train_loss", "epoch_s"}
    metrics = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in skip and isinstance(v, float))
    of = f"/{s.epochs}" if s.epochs else ""
    return f"[{s.name}] epoch {row['epoch']}{of} train_loss {row['train_loss']:.4f} {metrics} ({row['epoch_s']:.1f}s)"
