"""The stage-2 training loop for classifiers (plain torch; the Ray Train worker calls it).

Warmup is counted in optimizer steps (Clinical LLaMA-LoRA passed a ratio where a step
count was expected). The loss is class-weighted cross-entropy with weights N/(K·n_k),
plain cross-entropy, or BCE for multi-label. After every epoch the dev set is scored;
early stopping watches dev macro AUROC, and the best epoch's trainable weights are the
ones kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ray_med.data.tasks import TaskData, class_weights
from ray_med.evaluation.metrics import classification_metrics, sigmoid, softmax


@dataclass
class ClassifyTrainConfig:
    """Optimisation of a stage-2 classifier."""

    epochs: int = 4
    """Passes over the training split."""
    batch_size: int = 16
    """Examples per step (per worker)."""
    lr: float = 5e-4
    """Peak learning rate (adapters and head; full fine-tuning wants ~5e-5)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warmup, in optimizer steps."""
    loss: Literal["weighted_ce", "ce", "bce"] = "weighted_ce"
    """weighted_ce (N/(K n_k) class weights), ce, or bce (multi-label)."""
    patience: int = 2
    """Stop after this many epochs without a better dev macro AUROC."""
    max_length: int = 256
    """Tokens per example (question + context are truncated to fit)."""
    grad_clip: float = 1.0
    """Gradient clipping by global norm (0 disables)."""


def encode(tokenizer: Any, data: TaskData, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids and attention masks of every example, padded to the longest."""
    return encode_texts(tokenizer, data.texts, data.pairs, max_length)


def encode_texts(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int
) -> dict[str, torch.Tensor]:
    """:func:`encode` on raw texts (and optional second segments): what the classify endpoint sends."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # the loop trims each batch to its longest example
    # longest_first trims the longer text of a pair first (in practice the context), and
    # still works when a question alone is longer than max_length.
    enc = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def predict(model: torch.nn.Module, inputs: dict[str, torch.Tensor], task_type: str, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (softmax), or per-label probabilities (sigmoid) for multi-label."""
    model.eval()
    device = next(model.parameters()).device
    logits = []
    with torch.inference_mode():
        for i in range(0, len(inputs["input_ids"]), batch_size):
            mask = inputs["attention_mask"][i : i + batch_size]
            width = int(mask.sum(1).max())
            ids = inputs["input_ids"][i : i + batch_size][:, :width].to(device)
            logits.append(model(ids, mask[:, :width].to(device)).float().cpu().numpy())
    out = np.concatenate(logits)
    return sigmoid(out) if task_type == "multilabel" else softmax(out)


def _loss_fn(cfg: ClassifyTrainConfig, task_type: str, y: np.ndarray, k: int) -> Callable[..., torch.Tensor]:
    if task_type == "multilabel" or cfg.loss == "bce":
        return torch.nn.BCEWithLogitsLoss()
    weight = torch.tensor(class_weights(y, k), dtype=torch.float32) if cfg.loss == "weighted_ce" else None
    return torch.nn.CrossEntropyLoss(weight=weight)


def train_classifier(
    model: torch.nn.Module,
    train_inputs: dict[str, torch.Tensor],
    train: TaskData,
    dev_inputs: dict[str, torch.Tensor],
    dev: TaskData,
    cfg: ClassifyTrainConfig,
    *,
    task_type: str,
    ordinal: bool = False,
    seed: int = 0,
    report: Callable[[dict[str, Any]], None] | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Train, early-stop on dev macro AUROC, restore the best epoch; return the history.

    ``wrap`` (e.g. DDP) wraps the model for the forward/backward only; ``shard`` is
    (rank, world) so each data-parallel worker takes its own slice of every epoch.
    """
    k = len(train.labels)
    loss_fn = _loss_fn(cfg, task_type, train.y, k)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rank, world = shard
    n = len(train.y)
    steps_per_epoch = math.ceil(n / world / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / cfg.warmup_steps if s < cfg.warmup_steps
        else max(0.0, (total - s) / max(1, total - cfg.warmup_steps)),
    )
    runner = wrap(model) if wrap is not None else model
    y_train = torch.as_tensor(train.y)
    gen = torch.Generator().manual_seed(seed)
    best = {"auroc": -math.inf, "epoch": -1, "state": None}
    history, since_best = [], 0
    for epoch in range(cfg.epochs):
        runner.train()
        order = torch.randperm(n, generator=gen)[rank::world]
        t0, losses = time.perf_counter(), []
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            mask = train_inputs["attention_mask"][idx]
            width = int(mask.sum(1).max())  # right padding: cut the batch to its longest example
            logits = runner(train_inputs["input_ids"][idx][:, :width], mask[:, :width])
            target = y_train[idx].float() if task_type == "multilabel" or cfg.loss == "bce" else y_train[idx]
            if cfg.loss == "bce" and task_type != "multilabel":
                target = torch.nn.functional.one_hot(y_train[idx], k).float()
            loss = loss_fn(logits, target)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        scores = predict(model, dev_inputs, task_type)
        metrics = classification_metrics(dev.y, scores, task_type, ordinal=ordinal, n_bootstrap=0)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_auroc": metrics["auroc_macro"],
               "dev_accuracy": metrics["accuracy"], "epoch_s": time.perf_counter() - t0}
        history.append(row)
        if report is not None:
            report(row)
        if metrics["auroc_macro"] > best["auroc"]:
            best = {"auroc": metrics["auroc_macro"], "epoch": epoch + 1,
                    "state": {n_: p.detach().clone() for n_, p in model.named_parameters() if p.requires_grad}}
            since_best = 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    if best["state"] is not None:
        with torch.no_grad():
            for n_, p in model.named_parameters():
                if n_ in best["state"]:
                    p.copy_(best["state"][n_])
    return {"history": history, "best_epoch": best["epoch"], "best_dev_auroc": best["auroc"]}
