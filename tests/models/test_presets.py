"""Presets: tiny models run, real-size shapes count exactly on the meta device, ZeRO memory arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from ray_med.errors import ModelError
from ray_med.models import (
    ModelConfig,
    build_model,
    count_parameters,
    get_preset,
    list_presets,
    memory_plan,
    preset_config,
)


def _llama_params(*, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int) -> int:
    """Llama parameter count from its shape: untied embeddings, no biases, two RMSNorms a layer."""
    kv = hidden // heads * kv_heads
    attn = 2 * hidden * hidden + 2 * hidden * kv
    mlp = 3 * hidden * inter
    return 2 * vocab * hidden + layers * (attn + mlp + 2 * hidden) + hidden


def test_tiny_llama_forward_loss_and_backward() -> None:
    torch.manual_seed(0)
    model = build_model("tiny-llama", vocab_size=300)
    ids = torch.randint(0, 300, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 300)
    # Random init predicts close to uniform: the loss is near ln(vocab).
    assert math.isfinite(out.loss.item()) and abs(out.loss.item() - math.log(300)) < 0.5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tiny_llama_shape_and_default_vocab() -> None:
    model = build_model("tiny-llama")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == 2048 and cfg.max_position_embeddings == 512 and not cfg.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()


def test_tiny_vit_forward_and_classifier() -> None:
    model = build_model("tiny-vit")
    out = model(pixel_values=torch.rand(2, 1, 28, 28))
    assert out.last_hidden_state.shape == (2, 17, 64)  # 16 patches of 7x7 + CLS
    clf = build_model("tiny-vit", num_labels=3)
    assert clf(pixel_values=torch.rand(2, 1, 28, 28)).logits.shape == (2, 3)


def test_tiny_bert_encoder_forward() -> None:
    model = build_model("tiny-bert", vocab_size=300)
    ids = torch.randint(0, 300, (2, 10))
    assert model(input_ids=ids).last_hidden_state.shape == (2, 10, 64)
    clf = build_model("tiny-bert", vocab_size=300, num_labels=2)
    assert clf(input_ids=ids).logits.shape == (2, 2)


def test_dtype_is_applied_at_construction() -> None:
    model = build_model("tiny-llama", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the temporary default was restored


@pytest.mark.parametrize(
    ("preset", "expected", "shape"),
    [
        ("llama2-7b", 6_738_415_616, dict(hidden=4096, layers=32, heads=32, kv_heads=32, inter=11008)),
        ("llama2-13b", 13_015_864_320, dict(hidden=5120, layers=40, heads=40, kv_heads=40, inter=13824)),
        ("llama2-70b", 68_976_648_192, dict(hidden=8192, layers=80, heads=64, kv_heads=8, inter=28672)),
        ("meditron-7b", 6_738_415_616, dict(hidden=4096, layers=32, heads=32, kv_heads=32, inter=11008)),
        ("meditron-70b", 68_976_648_192, dict(hidden=8192, layers=80, heads=64, kv_heads=8, inter=28672)),
        ("llama-1b", 1_100_048_384, dict(hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632)),
    ],
)
def test_real_size_presets_count_exactly_on_meta(preset: str, expected: int, shape: dict[str, int]) -> None:
    assert _llama_params(vocab=32000, **shape) == expected  # the published count follows from the shape
    model = build_model(preset, device="meta")
    assert count_parameters(model) == expected
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_count_parameters_trainable_only() -> None:
    model = build_model("tiny-llama", vocab_size=300)
    total = count_parameters(model)
    model.get_input_embeddings().weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - 300 * 64
    assert count_parameters(model) == total


def test_registry_lists_every_preset_with_its_family() -> None:
    names = list_presets()
    assert names[:3] == ["tiny-llama", "tiny-vit", "tiny-bert"]
    assert {"llama2-7b", "llama2-13b", "llama2-70b", "meditron-7b", "meditron-70b", "llama-1b"} <= set(names)
    assert get_preset("tiny-vit").family == "vit" and get_preset("tiny-bert").family == "encoder"
    assert get_preset("tiny-vlm").family == get_preset("medpalm-m-7b").family == "vlm"
    assert all(get_preset(n).family == "causal_lm" for n in names if "llama" in n or "meditron" in n)
    assert all(get_preset(n).description for n in names)
    assert preset_config("tiny-llama", vocab_size=123).vocab_size == 123
    assert preset_config("meditron-7b").max_position_embeddings == 2048  # Meditron-7B's 2K context


def test_unknown_preset_lists_valid_names_and_suggests_one() -> None:
    with pytest.raises(ModelError, match=r"unknown model preset 'tiny-lama'\. Did you mean 'tiny-llama'\?") as err:
        build_model("tiny-lama")
    assert "Valid presets: tiny-llama, tiny-vit" in str(err.value)
    # A job config fails while it is parsed, not when the model is built.
    with pytest.raises(ModelError, match="Did you mean 'llama2-70b'"):
        ModelConfig(preset="llama2-70")
    with pytest.raises(ModelError, match="Valid presets") as err:
        get_preset("gpt-5")
    assert "Did you mean" not in str(err.value)


def test_preset_options_that_do_not_apply_are_refused() -> None:
    with pytest.raises(ModelError, match="no vocabulary"):
        build_model("tiny-vit", vocab_size=100)
    with pytest.raises(ModelError, match="num_labels applies to vit and encoder"):
        build_model("tiny-llama", num_labels=2)
    with pytest.raises(ModelError, match="vocab_size must be a positive integer"):
        build_model("tiny-llama", vocab_size=0)
    with pytest.raises(ModelError, match="bad device"):
        build_model("tiny-llama", device="gpu0")


def test_model_config_validation() -> None:
    assert ModelConfig().preset == "tiny-llama"
    with pytest.raises(ModelError, match="model.dtype must be one of float32, bfloat16, float16"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ModelError, match="either model.preset or model.path"):
        ModelConfig(preset=None)
    with pytest.raises(ModelError, match="presets only"):
        ModelConfig(path="some/folder", vocab_size=1000)
    with pytest.raises(ModelError, match="positive"):
        ModelConfig(vocab_size=-1)
    # With a path the preset is ignored, so its default need not match anything.
    assert ModelConfig(preset=None, path="org/model").path == "org/model"


GB = 1e9


def test_memory_plan_reproduces_the_zero_paper_example() -> None:
    # ZeRO paper, figure 1: a 7.5B-parameter model on 64 GPUs with mixed-precision Adam.
    n = 7_500_000_000
    assert memory_plan(n, zero_stage=0, num_gpus=64)["total"] == pytest.approx(120 * GB)  # 16 B/param
    assert memory_plan(n, zero_stage=1, num_gpus=64)["total"] == pytest.approx(31.40625 * GB)  # 4 + 12/64
    assert memory_plan(n, zero_stage=2, num_gpus=64)["total"] == pytest.approx(16.640625 * GB)  # 2 + 14/64
    assert memory_plan(n, zero_stage=3, num_gpus=64)["total"] == pytest.approx(1.875 * GB)  # 16/64


def test_memory_plan_parts_by_hand() -> None:
    n = 1_000_000
    plan = memory_plan(n, zero_stage=2, num_gpus=8)
    assert plan == {
        "weights": 2_000_000.0, "gradients": 250_000.0, "optimizer": 1_500_000.0,
        "total": 3_750_000.0, "cpu_optimizer": 0.0,
    }
    # One GPU: partitioning changes nothing.
    assert memory_plan(n, zero_stage=3, num_gpus=1)["total"] == 16 * n
    # ZeRO-Offload keeps this GPU's optimizer shard in host memory instead.
    off = memory_plan(n, zero_stage=3, num_gpus=4, offload_optimizer=True)
    assert (off["optimizer"], off["cpu_optimizer"], off["total"]) == (0.0, 3_000_000.0, 1_000_000.0)
    # Pure fp32 training: the weights are their own master copy, so Adam adds 8 B/param.
    assert memory_plan(n, param_bytes=4)["total"] == 16 * n
    # Llama-2-7B in bf16 with ZeRO-3 on 8 GPUs: 16 B/param / 8.
    assert memory_plan(6_738_415_616, zero_stage=3, num_gpus=8)["total"] == pytest.approx(6_738_415_616 * 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(zero_stage=4), "zero_stage"),
        (dict(num_gpus=0), "num_gpus"),
        (dict(param_bytes=3), "param_bytes"),
        (dict(offload_optimizer=True), "zero_stage 1, 2 or 3"),
    ],
)
def test_memory_plan_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        memory_plan(1000, **kwargs)
