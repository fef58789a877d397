"""Classifier inference: texts to token ids, and token ids to class probabilities.

Training (dev scoring), ``evaluate.py classify`` and the ``/v1/classify`` endpoint all
encode and predict with these two functions, so the three agree on every example.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ray_med.evaluation.metrics import sigmoid, softmax
from ray_med.tasks.classification import TaskData


def encode(tokenizer: Any, data: TaskData, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids and attention masks of every example, padded to the longest."""
    return encode_texts(tokenizer, data.texts, data.pairs, max_length)


def encode_texts(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int
) -> dict[str, torch.Tensor]:
    """:func:`encode` on raw texts (and optional second segments): what the classify endpoint sends."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # batches are trimmed to their longest example
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
