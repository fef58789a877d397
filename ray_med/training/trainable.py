"""The trainable weights of a plain-torch stage as the loop's checkpoint and best-weights callables. No Ray.

The downstream classifier and the multimodal model train a subset of their weights with
a plain torch optimizer. Both keep the same state: the trainable weights, a copy of the
best evaluation's weights, the optimizer and the schedule. :class:`TrainableState` is
that state, with the loop's ``on_best`` (:meth:`snapshot`), ``restore_best``
(:meth:`restore`) and a checkpointer's ``write``/``read`` of ``trainable.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TRAINABLE_FILE = "trainable.pt"


class TrainableState:
    """Trainable weights by name, their best copy, the optimizer and schedule; rank 0 writes them."""

    def __init__(self, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, sched: Any, *,
                 rank: int = 0, keep_best: bool = True) -> None:
        self.params, self.opt, self.sched, self.rank, self.keep_best = params, opt, sched, rank, keep_best
        self.best: dict[str, torch.Tensor] = {}

    def snapshot(self) -> None:
        """Keep a copy of the weights as they are (the loop calls it on a new best evaluation)."""
        if self.keep_best:
            self.best = {n: p.detach().clone() for n, p in self.params.items()}

    def restore(self) -> None:
        """Put the best copy back (the loop calls it at the end when keeping the best)."""
        if self.best:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.best[n])

    def write(self, folder: Path) -> None:
        if self.rank == 0:  # every rank holds the same weights (data parallel)
            torch.save({"params": {n: p.detach().cpu() for n, p in self.params.items()}, "best": self.best,
                        "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}, folder / TRAINABLE_FILE)

    def read(self, folder: Path) -> None:
        saved = torch.load(folder / TRAINABLE_FILE, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(saved["params"][n])
        self.best = dict(saved["best"])
        self.opt.load_state_dict(saved["opt"])
        self.sched.load_state_dict(saved["sched"])
