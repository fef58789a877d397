"""GPU sizing of the shipped GPU configs from memory_plan (no Ray, meta-device models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_med.cluster.sizing import main, size
from ray_med.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_pretraining_is_sized_by_its_zero_stage_and_workers() -> None:
    s = size(REPO / "jobs/configs/pretrain/llama2_7b_gap.yaml", preset="llama2-7b")
    n = s.params
    assert 6.7e9 < n < 6.8e9 and s.trainable == n and (s.workers, s.zero_stage) == (32, 2)
    # ZeRO-2 over 32 GPUs: bf16 weights whole, bf16 grads and 12-byte Adam state sharded.
    assert s.per_gpu["total"] == pytest.approx(2 * n + (2 + 12) * n / 32)
    s70 = size(REPO / "jobs/configs/pretrain/meditron_70b_gap.yaml", preset="llama2-70b")
    assert s70.zero_stage == 3 and s70.per_gpu["total"] == pytest.approx(16 * s70.params / 128)


def test_adapter_jobs_hold_a_frozen_base_and_train_only_their_adapters(tmp_path: Path) -> None:
    lora = size(REPO / "jobs/configs/finetune/llama2_7b_mimic_mor.yaml", preset="llama2-7b")
    # r=16 on q_proj and v_proj (4096 x 4096) of 32 layers.
    assert lora.trainable == 32 * 2 * 16 * (4096 + 4096)
    assert lora.per_gpu["weights"] == pytest.approx(2 * lora.params + 4 * lora.trainable)
    m3oe = size(REPO / "jobs/configs/inject/fedkim.yaml", preset="llama2-7b")
    assert m3oe.trainable == 12 * 32 * 8 * 4 * (4096 + 4096)  # 12 experts of rank 8 on q/k/v/o
    # The multimodal LoRA is on the language model only (not the tower's same-named projections),
    # and its projector (SigLIP 1152 -> 4096 -> 4096, with biases) trains beside it.
    vlm = size(REPO / "jobs/configs/multimodal/medpalm_m_7b.yaml")
    assert vlm.trainable == 32 * 4 * 16 * (4096 + 4096) + (1152 * 4096 + 4096) + (4096 * 4096 + 4096)
    # A sweep's trials are its base plus its overrides: 2 workers each.
    assert size(REPO / "jobs/configs/sweep/llama2_7b_mimic_mor_gpu.yaml", preset="llama2-7b").workers == 2


def test_a_model_folder_not_here_needs_a_preset(capsys) -> None:
    with pytest.raises(ConfigError, match="--preset"):
        size(REPO / "jobs/configs/finetune/llama2_7b_mimic_mor.yaml")
    assert main([str(REPO / "jobs/configs/finetune/llama2_7b_mimic_mor.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not on this machine" in err


def test_the_jobs_own_defaults_apply(tmp_path: Path) -> None:
    """No deepspeed block: the pretraining job's ZeRO-2 default; one worker: stage 0 unless offloading."""
    config = tmp_path / "pretrain.yaml"
    config.write_text("model: {preset: llama2-7b}\nscaling: {num_workers: 8}\n")
    s = size(config)
    assert s.zero_stage == 2 and s.per_gpu["total"] == pytest.approx(2 * s.params + 14 * s.params / 8)
    config.write_text("model: {preset: llama2-7b}\nscaling: {num_workers: 1}\n"
                      "deepspeed: {zero_stage: 3, offload_optimizer: true}\n")
    s = size(config)
    assert s.zero_stage == 3 and s.per_gpu["optimizer"] == 0 and s.per_gpu["cpu_optimizer"] == 12 * s.params
