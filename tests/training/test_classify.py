"""The stage-2 loop: it learns, early-stops on dev AUROC, and keeps the best epoch (tiny model, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.stacking import ClassifierSpec, build_classifier
from ray_med.data import read_records
from ray_med.evaluation.classify import encode, predict
from ray_med.evaluation.metrics import classification_metrics
from ray_med.models import build_model, train_bpe_tokenizer
from ray_med.tasks import get_task, task_data
from ray_med.training.classify import train_classifier
from ray_med.training.config import ClassifyTrainConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_loop_learns_and_restores_the_best_epoch() -> None:
    torch.manual_seed(0)
    records = read_records("mimic_outcomes", str(FIXTURES / "mimic_outcomes_mor.csv")).records
    data = task_data(get_task("mimic_mor"), records)
    tok = train_bpe_tokenizer([r.text for r in records] * 5, vocab_size=300)
    spec = ClassifierSpec(num_labels=2, task_type="binary", pooling="last",
                          downstream=AdapterConfig(r=4, alpha=8))
    model = build_classifier(build_model("tiny-llama", vocab_size=len(tok)), spec)
    inputs = encode(tok, data, max_length=64)
    cfg = ClassifyTrainConfig(epochs=12, batch_size=3, lr=2e-2, warmup_steps=2, patience=4)
    seen = []
    result = train_classifier(model, inputs, data, inputs, data, cfg, task_type="binary", report=seen.append)
    assert [r["epoch"] for r in seen] == list(range(1, len(seen) + 1))
    assert seen[-1]["train_loss"] < seen[0]["train_loss"]
    # The weights kept are the best epoch's: scoring again gives exactly its AUROC.
    again = classification_metrics(data.y, predict(model, inputs, "binary"), "binary", n_bootstrap=0)
    assert again["auroc_macro"] == result["best_dev_auroc"] == max(r["dev_auroc"] for r in seen)
    assert result["best_dev_auroc"] > 0.8
    if len(seen) < cfg.epochs:  # stopped early: patience epochs without improvement
        assert len(seen) - result["best_epoch"] == cfg.patience
    assert np.isfinite(seen[-1]["epoch_s"])
