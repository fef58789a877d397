"""Pretraining end to end on the shared local Ray: 2 workers, ZeRO-2, a killed worker, exact resume, more steps."""

from __future__ import annotations

import importlib.util
import json
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.deepspeed]


def _main():
    spec = importlib.util.spec_from_file_location("job_pretrain", REPO / "jobs" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _args(storage: Path, shared: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "jobs/configs/pretrain/tiny.yaml"),
        f"run.storage={storage}", f"run.name={name}", f"corpus.root={shared}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "deepspeed.zero_stage=2",
        "train.seq_len=64", "train.micro_batch_size=4", "train.log_every=1", "train.report_every=2",
        "tokenizer.vocab_size=512", "optim.warmup_steps=2", "eval.every_steps=100", "eval.max_sequences=8",
        "checkpoint.every_steps=3", "checkpoint.keep=2", *extra,
    ]


def _train_rows(run: Path) -> list[dict]:
    return [r for r in json.loads((run / "metrics.json").read_text()) if "loss" in r]


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint object, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _deepspeed_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of every rank's DeepSpeed files (weights, optimizer and scheduler state) in a checkpoint."""
    out = {}
    for f in sorted((checkpoint / "ds").glob("*.pt")):
        out.update(_tensors(torch.load(f, map_location="cpu", weights_only=False), f.name))
    return out


def test_two_workers_zero2_learn_survive_a_killed_worker_and_resume(ray_session, shared_data, tmp_path, capsys) -> None:
    name = f"resume-{uuid.uuid4().hex[:6]}"
    # Rank 1 dies at step 5: Ray Train restarts the worker group from the step-3 checkpoint.
    code = _main()(_args(tmp_path, shared_data, name, "train.max_steps=6", "train.fail_at_step=5",
                         "scaling.max_failures=2"))
    assert code == 0
    assert (Path(tempfile.gettempdir()) / f"ray_med-failed-{name}").read_text() == "5"  # rank 1 really died
    run = tmp_path / name
    rows = _train_rows(run)
    # Steps 4-5 ran twice (after the step-3 checkpoint, then again after the restart);
    # the history restored from that checkpoint has each step once.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    history = json.loads((run / "metrics.json").read_text())
    assert len([r for r in history if r["step"] == 0]) == 1  # resumed, not restarted from scratch

    # Exact resume: the same run never interrupted ends with the same weights and optimizer state.
    ref_name = f"whole-{uuid.uuid4().hex[:6]}"
    assert _main()(_args(tmp_path, shared_data, ref_name, "train.max_steps=6")) == 0
    ref = tmp_path / ref_name
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in _train_rows(ref)], abs=1e-6)
    resumed_w, whole_w = load_file(run / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert resumed_w.keys() == whole_w.keys()
    for key in whole_w:
        torch.testing.assert_close(resumed_w[key], whole_w[key], rtol=0, atol=1e-6, msg=key)
    resumed_s, whole_s = _deepspeed_state(run / "checkpoint_step0000006"), _deepspeed_state(ref / "checkpoint_step0000006")
    assert resumed_s.keys() == whole_s.keys() and any("optim" in k for k in whole_s)
    for key in whole_s:
        torch.testing.assert_close(resumed_s[key], whole_s[key], rtol=0, atol=1e-6, msg=key)

    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # it learns
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["mfu"] > 0 for r in rows)
    checkpoints = sorted(p.name for p in run.glob("checkpoint_step*"))
    assert checkpoints == ["checkpoint_step0000003", "checkpoint_step0000006"]
    state = json.loads((run / "checkpoint_step0000006" / "train_state.json").read_text())
    assert state["state"]["step"] == 6

    # The exported model is a plain HF folder.
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.vocab_size == len(tok)
    assert (run / "plots" / "loss.png").stat().st_size > 1000

    # evaluate.py scores the held-out file with the same code as the in-training eval.
    final_eval = history[-1]
    spec = importlib.util.spec_from_file_location("job_evaluate", REPO / "jobs" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    capsys.readouterr()
    assert evaluate.main(["perplexity", "--model", str(run / "model"), "--data", str(run / "heldout/abstracts.jsonl"),
                          "--format", "jsonl", "--seq-len", "64", "--max-sequences", "8"]) == 0
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert offline["tokens"] == 8 * 63
    assert offline["loss"] == pytest.approx(final_eval["eval/abstracts/loss"], rel=1e-5)
    assert offline["perplexity"] == pytest.approx(final_eval["eval/abstracts/perplexity"], rel=1e-4)

    # Same run, more steps: it resumes from step 6 and trains only steps 7-9.
    assert _main()(_args(tmp_path, shared_data, name, "train.max_steps=9")) == 0
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 10))
    evals_at_0 = [r for r in json.loads((run / "metrics.json").read_text()) if r["step"] == 0]
    assert len(evals_at_0) == 1  # evaluated before training once, not again on resume
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == ["checkpoint_step0000006", "checkpoint_step0000009"]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and len(record["attempts"]) == 2  # the same run, submitted twice
