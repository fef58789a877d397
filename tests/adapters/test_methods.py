"""Every PEFT method trains as a stage-1 (causal LM) adapter on a tiny Llama and is scored by lm_nll."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.registry import METHODS, peft_config
from ray_med.evaluation.perplexity import lm_nll
from ray_med.models import build_model, count_parameters

# The PEFT methods; m3oe has no PEFT config (its own layers, tested in test_m3oe.py).
PEFT_METHODS = [name for name, m in METHODS.items() if m.peft_type != "M3OE"]


def test_every_method_but_m3oe_is_a_peft_method() -> None:
    assert set(METHODS) - set(PEFT_METHODS) == {"m3oe"}


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_method_trains_only_its_adapter_and_scores(method: str) -> None:
    torch.manual_seed(0)
    base = build_model("tiny-llama", vocab_size=300)
    cfg = AdapterConfig(method=method, r=4, alpha=8, num_virtual_tokens=5, adapter_len=4, adapter_layers=30,
                        encoder_hidden_size=32)
    model = peft.get_peft_model(base, peft_config(cfg, model_config=base.config))
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    assert 0 < trainable < total
    ids = torch.randint(0, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    acc = lm_nll(lambda x: model(input_ids=x), np.random.default_rng(0).integers(0, 300, (3, 16)), batch_size=2)
    assert acc.tokens == 3 * 15 and np.isfinite(acc.perplexity)
