"""Stacked adapters are really active, and "frozen" really freezes (no Ray, tiny models)."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from ray_med.adapters.classifier import save_classifier
from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.registry import peft_config
from ray_med.adapters.stacking import (
    ClassifierSpec,
    SequenceClassifier,
    build_classifier,
    describe_trainable,
)
from ray_med.errors import ConfigError, ModelError
from ray_med.models import build_model, save_pretrained


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_pretrained(build_model("tiny-llama", vocab_size=300), tmp_path / "base")


def _fresh_base(base_dir: Path):
    from ray_med.models import load_causal_lm

    return load_causal_lm(str(base_dir))


@pytest.fixture
def domain_dir(base_dir: Path, tmp_path: Path) -> Path:
    """A stage-1 LoRA with non-zero weights (a fresh LoRA's B is zero: it would change nothing)."""
    model = peft.get_peft_model(_fresh_base(base_dir), peft_config(AdapterConfig(r=4, alpha=8)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(tmp_path / "domain"))
    return tmp_path / "domain"


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return ids, mask


def _lora_params(model: SequenceClassifier, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.body.named_parameters() if f".{adapter}." in n and "lora_" in n]


def test_each_stacked_adapter_changes_the_logits(base_dir: Path, domain_dir: Path) -> None:
    spec = ClassifierSpec(num_labels=3, pooling="last", domain_adapter=str(domain_dir),
                          downstream=AdapterConfig(r=4, alpha=8))
    model = build_classifier(_fresh_base(base_dir), spec).eval()
    ids, mask = _batch()
    with torch.no_grad():
        reference = model(ids, mask)
        for adapter in ("domain", "default"):
            params = _lora_params(model, adapter)
            assert params, f"no LoRA weights for adapter {adapter}"
            saved = [p.clone() for p in params]
            for p in params:
                p.add_(0.3)
            changed = model(ids, mask)
            assert not torch.allclose(changed, reference, atol=1e-5), f"adapter {adapter} is not active"
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        assert torch.allclose(model(ids, mask), reference)


def test_frozen_domain_adapter_stays_frozen(base_dir: Path, domain_dir: Path) -> None:
    for trainable in (False, True):
        spec = ClassifierSpec(num_labels=2, pooling="last", domain_adapter=str(domain_dir),
                              domain_trainable=trainable, downstream=AdapterConfig(r=4, alpha=8))
        model = build_classifier(_fresh_base(base_dir), spec)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids, mask = _batch()
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 1]))
            loss.backward()
            opt.step()
            opt.zero_grad()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        domain = {n for n in before if ".domain." in n}
        downstream = {n for n in before if ".default." in n and "lora_" in n}
        base = {n for n in before if "lora_" not in n and not n.startswith("head.")}
        assert downstream <= moved and {"head.weight", "head.bias"} <= moved
        assert not (base & moved), "the base model must never train in the adapter setting"
        if trainable:
            assert domain & moved
        else:
            assert not (domain & moved), "a frozen stage-1 adapter changed"


def test_head_only_and_full_settings(base_dir: Path) -> None:
    head_only = build_classifier(_fresh_base(base_dir), ClassifierSpec(num_labels=2, setting="head_only"))
    counts = describe_trainable(head_only)
    assert counts["trainable_body"] == 0 and counts["trainable"] == 64 * 2 + 2
    full = build_classifier(_fresh_base(base_dir), ClassifierSpec(num_labels=2, setting="full", downstream=None))
    assert describe_trainable(full)["trainable"] == describe_trainable(full)["total"]
    with pytest.raises(ConfigError, match="full fine-tuning takes no adapters"):
        build_classifier(_fresh_base(base_dir), ClassifierSpec(num_labels=2, setting="full"))


def test_saved_downstream_adapter_is_plain_peft(base_dir: Path, domain_dir: Path, tmp_path: Path) -> None:
    spec = ClassifierSpec(num_labels=2, pooling="last", domain_adapter=str(domain_dir), domain_trainable=True,
                          downstream=AdapterConfig(r=4, alpha=8), labels=["no", "yes"])
    model = build_classifier(_fresh_base(base_dir), spec)
    out = save_classifier(model, spec, tmp_path / "out", str(base_dir))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "domain" / "adapter_config.json").is_file()
    assert (out / "classifier_head.safetensors").is_file()
    reloaded = peft.PeftModel.from_pretrained(_fresh_base(base_dir), str(out))
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        build_classifier(_fresh_base(base_dir), ClassifierSpec(num_labels=2, domain_adapter=str(tmp_path)))
