"""The training loop on its own (no Ray): accumulation, checkpoints and exact resume, early stopping, no data."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch

from ray_med.errors import DataError
from ray_med.training.loop import LoopSettings, LoopState, StepResult, run_loop

DATA = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
TARGET = DATA @ torch.tensor([1.0, -2.0, 0.5])


class Trainer:
    """A linear model with SGD, the loop's callables, and checkpoints kept in memory."""

    def __init__(self, settings: LoopSettings) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.settings = settings
        self.checkpoints: list[tuple[dict, LoopState]] = []
        self.seen: list[list[int]] = []
        self.reports: list[dict] = []

    def step(self, idx: list[int], boundary: bool) -> StepResult:
        self.seen.append(idx)
        loss = ((self.model(DATA[idx]).squeeze(1) - TARGET[idx]) ** 2).mean() / self.settings.grad_accum
        loss.backward()
        if boundary:
            self.opt.step()
            self.opt.zero_grad()
        return StepResult(loss.detach(), len(idx), 0.0, 0.05)

    def batches(self, epoch: int, skip: int) -> Iterator[list[int]]:
        order = torch.randperm(40, generator=torch.Generator().manual_seed(epoch)).tolist()
        for b in range(skip, 10):
            yield order[b * 4 : (b + 1) * 4]

    @contextlib.contextmanager
    def save(self, state: LoopState) -> Iterator[int]:
        self.checkpoints.append(({"model": copy.deepcopy(self.model.state_dict()),
                                  "opt": copy.deepcopy(self.opt.state_dict())}, copy.deepcopy(state)))
        yield len(self.checkpoints)

    def run(self, *, resume_from: Trainer | None = None, crash_at: int | None = None) -> LoopState:
        def load() -> LoopState | None:
            if resume_from is None or not resume_from.checkpoints:
                return None
            weights, state = resume_from.checkpoints[-1]
            self.model.load_state_dict(weights["model"])
            self.opt.load_state_dict(weights["opt"])
            return copy.deepcopy(state)

        def on_step(state: LoopState) -> None:
            if crash_at is not None and state.step == crash_at:
                raise RuntimeError("worker killed")

        return run_loop(self.settings, step=self.step, batches=self.batches, save=self.save, load=load,
                        report=lambda m, c: self.reports.append(m), on_step=on_step)


def test_resume_after_a_crash_ends_with_the_exact_weights_and_no_batch_twice() -> None:
    settings = LoopSettings(max_steps=12, grad_accum=2, log_every=1, checkpoint_every=3)
    whole = Trainer(settings)
    whole.run()
    crashed = Trainer(settings)
    with pytest.raises(RuntimeError, match="worker killed"):
        crashed.run(crash_at=8)  # steps 7-8 are lost: the last checkpoint is at step 6
    resumed = Trainer(settings)
    state = resumed.run(resume_from=crashed)
    assert state.step == 12 and state.finished
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The resumed run trained on exactly the micro-batches after the checkpoint's position.
    assert crashed.seen[: 6 * 2] + resumed.seen == whole.seen
    assert [r["step"] for r in state.history if "loss" in r] == list(range(1, 13))
    # 12 steps of 2 micro-batches of 10 per epoch: the run crossed an epoch end.
    assert state.epoch == 2 and state.batches_in_epoch == 4


def test_early_stopping_keeps_the_best_evaluation() -> None:
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    restored = []
    settings = LoopSettings(epochs=5, per_epoch=True, monitor="dev_auroc", patience=2, keep_best=True, log_every=0)
    trainer = Trainer(settings)
    state = run_loop(settings, step=trainer.step, batches=trainer.batches,
                     evaluate=lambda: {"dev_auroc": next(scores)}, report=lambda m, c: trainer.reports.append(m),
                     restore_best=lambda: restored.append(True))
    assert state.stopped_early and state.epoch == 4 and state.best == 0.7 and state.best_epoch == 2
    assert restored == [True]
    assert [r["epoch"] for r in trainer.reports] == [1, 2, 3, 4]  # every epoch reported, not the fifth


def test_data_without_a_full_batch_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="no full batch"):
        run_loop(LoopSettings(max_steps=2), step=lambda b, boundary: StepResult(0.0, 0), batches=lambda e, s: [])


class FakeClock:
    """Time that moves only when told: training costs 1 s a micro-batch, everything else much more."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("world", [1, 2])
def test_tokens_per_s_is_the_log_window_whatever_reports_checkpoints_and_evals_fall_on(world: int) -> None:
    clock = FakeClock()
    # Reports, checkpoints and evaluations on steps that are not multiples of log_every.
    settings = LoopSettings(max_steps=14, grad_accum=2, log_every=3, report_every=2, checkpoint_every=5,
                            eval_every=4, world=world)
    trainer = Trainer(settings)

    def step(idx: list[int], boundary: bool) -> StepResult:
        clock.now += 1.0
        return trainer.step(idx, boundary)

    @contextlib.contextmanager
    def save(state: LoopState) -> Iterator[None]:
        clock.now += 100.0
        yield None

    def report(metrics: dict, checkpoint: object) -> None:
        clock.now += 1000.0

    def evaluate() -> dict[str, float]:
        clock.now += 50.0
        return {"eval/loss": 1.0}

    clock.now += 7.0  # before the loop: not training time either
    state = run_loop(settings, step=step, batches=trainer.batches, save=save, report=report, evaluate=evaluate,
                     clock=clock)
    rows = [r for r in state.history if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6, 9, 12, 14]
    # 2 micro-batches of 4 items a step on each rank, 2 s a step: 4 * world tokens/s in every window.
    assert [r["tokens_per_s"] for r in rows] == [4.0 * world] * 5
    assert rows[-1]["tokens"] == 14 * 8 * world
