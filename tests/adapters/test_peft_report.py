"""Clinical LLaMA-LoRA Table 2: trainable parameters per PEFT method on the Llama-2-7B shape (meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_med.adapters.config import AdapterConfig
from ray_med.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_table2_counts_on_llama2_7b(job_main, capsys: pytest.CaptureFixture[str]) -> None:
    assert job_main("peft_report")(["--config", str(REPO / "jobs/configs/peft_report/llama2_7b_table2.yaml")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    counts = {r["method"]: r["trainable"] for r in report["rows"]}
    # LoRA r=16 on q,v: 32 layers x 2 modules x (4096x16 + 16x4096)
    assert counts["lora"] == 32 * 2 * (4096 * 16 + 16 * 4096) == 8_388_608
    # Adaption prompt: 30 layers x 10 tokens x 4096, plus one gate per layer
    assert counts["adaption_prompt"] == 30 * 10 * 4096 + 30
    # Prefix tuning without projection: 20 tokens x 32 layers x (key + value) x 4096
    assert counts["prefix"] == 20 * 32 * 2 * 4096 == 5_242_880
    # Prompt tuning: 15 tokens x 4096
    assert counts["prompt"] == 15 * 4096 == 61_440
    assert all(r["matches"] in (True, None) for r in report["rows"])
    assert "| LoRA r=16 on q_proj, v_proj | lora | 8,388,608 |" in out


def test_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="adapter.method must be one of"):
        AdapterConfig(method="ia3")  # type: ignore[arg-type]
