"""Worker groups of 2 on data that does not divide evenly, and exact resume of the downstream stage.

Every rank must make the same collective calls: DDP all-reduces in every backward, and
under ZeRO-3 every forward all-gathers the weights. A rank with one batch more than the
others waits for them forever, so each run here has a timeout that turns a hang into a
failure. The downstream stage is also killed mid-run and must end with exactly the
weights and optimizer state of the run that was not.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ray_med.adapters.classifier import load_classifier
from ray_med.config import from_dict
from ray_med.data import read_records
from ray_med.evaluation.classify import encode, predict
from ray_med.evaluation.metrics import classification_metrics
from ray_med.models import build_model, load_tokenizer, save_pretrained, train_bpe_tokenizer
from ray_med.models.config import ModelConfig
from ray_med.runtime import RunContext, Storage
from ray_med.tasks import get_task, task_data
from ray_med.training.config import (
    CheckpointSettings,
    DeepSpeedSettings,
    EvalSettings,
    FinetuneConfig,
    OptimConfig,
    ScalingSettings,
    TrainSettings,
)
from ray_med.training.downstream_worker import DownstreamSpec, downstream_worker
from ray_med.training.pretrain_worker import WorkerSpec, pretrain_worker
from ray_med.training.trainer import build_trainer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _fit(trainer):
    result = trainer.fit()
    assert type(result.return_value).__name__ != "UserFailure", result.return_value
    return result


@pytest.mark.deepspeed
@pytest.mark.timeout(300)  # a rank left waiting in a collective would hang here
def test_zero3_eval_on_uneven_heldout_blocks_matches_one_worker(ray_session, tmp_path) -> None:
    rng = np.random.default_rng(0)
    vocab, seq = 128, 16
    # 5 blocks over 2 ranks with micro-batch 2: rank 0 has 2 batches, rank 1 one; 1 block: rank 1 has none.
    eval_blocks = {"five": rng.integers(0, vocab, (5, seq)), "one": rng.integers(0, vocab, (1, seq))}
    train = ray_session.data.from_items([{"input_ids": rng.integers(0, vocab, seq)} for _ in range(16)])
    spec = WorkerSpec(
        model=ModelConfig(preset="tiny-llama"), vocab_size=vocab,
        train=TrainSettings(seq_len=seq, micro_batch_size=2, max_steps=2, log_every=1, report_every=0),
        optim=OptimConfig(warmup_steps=1), deepspeed=DeepSpeedSettings(zero_stage=3),
        checkpoint=CheckpointSettings(every_steps=0), eval=EvalSettings(every_steps=100), use_gpu=False, threads=1,
        seed=0, run_name="zero3-eval", eval_blocks=eval_blocks,
    )

    def run(workers: int) -> list[dict]:
        ctx = RunContext(job="pretrain", name=f"zero3-{workers}-{uuid.uuid4().hex[:6]}",
                         storage=Storage.parse(str(tmp_path)))
        scaling = ScalingSettings(num_workers=workers, cpus_per_worker=1, max_failures=0)
        return _fit(build_trainer(pretrain_worker, {"spec": spec}, scaling=scaling, ctx=ctx, threads=1,
                                  datasets={"train": train})).return_value

    two, one = run(2), run(0)  # 0: one worker in this process (ZeRO stage 0)
    assert {r["zero_stage"] for r in two if "loss" in r} == {3}
    assert {r["zero_stage"] for r in one if "loss" in r} == {0}
    # The same weights at step 0: every held-out block counted once, the padding not at all.
    start2, start1 = two[0], one[0]
    assert start2["step"] == start1["step"] == 0
    for name in eval_blocks:
        assert start2[f"eval/{name}/loss"] == pytest.approx(start1[f"eval/{name}/loss"], abs=1e-4)
    # Both evaluated again after the last step and finished.
    assert [r["step"] for r in two if "eval/five/loss" in r] == [0, 2]


def _downstream_spec(tmp_path: Path, out: str, **train: object) -> DownstreamSpec:
    records = read_records("mimic_outcomes", str(FIXTURES / "mimic_outcomes_mor.csv")).records
    tok = train_bpe_tokenizer([r.text for r in records] * 5, vocab_size=300)
    base = tmp_path / "base"
    if not base.exists():
        torch.manual_seed(0)
        save_pretrained(build_model("tiny-llama", vocab_size=len(tok)), base, tokenizer=tok)
    cfg = from_dict(FinetuneConfig, {
        "model": {"path": str(base), "preset": None}, "pooling": "last", "bootstrap": 0, "adapter": {"r": 4, "alpha": 8},
        "data": {"task": "mimic_mor"},
        "train": {"epochs": 3, "batch_size": 2, "max_length": 32, "patience": 10, "lr": 1e-2, "warmup_steps": 1,
                  **train},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1},
    })
    task = get_task("mimic_mor")
    data = task_data(task, records)
    # 13 training items: dealt out r::2 the ranks would get 7 and 6 (4 and 3 batches of 2).
    train_idx = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0])
    Path(out).mkdir(parents=True)
    return DownstreamSpec(cfg=cfg, base_path=str(base), train=data.take(train_idx), dev=data, task_type=task.task_type,
                          ordinal=False, out_dir=out, threads=1)


@pytest.mark.timeout(400)
def test_downstream_on_uneven_data_finishes_and_resumes_exactly_after_a_killed_worker(ray_session, tmp_path) -> None:
    def run(tag: str, **train: object):
        name = f"down-{tag}-{uuid.uuid4().hex[:6]}"
        spec = _downstream_spec(tmp_path, str(tmp_path / tag), **train)
        ctx = RunContext(job="finetune", name=name, storage=Storage.parse(str(tmp_path / "runs")))
        result = _fit(build_trainer(downstream_worker, {"spec": spec}, scaling=spec.cfg.scaling, ctx=ctx, threads=1,
                                    keep_checkpoints=1))
        return name, result

    _, whole = run("whole")
    # 13 items, 2 ranks, batch 2: 6 items each, so 3 steps an epoch on both ranks.
    history = whole.return_value["history"]
    assert [r["step"] for r in history] == [3, 6, 9]
    # The reported metrics are what one process scoring every item once gets from the saved classifier.
    spec = _downstream_spec(tmp_path, str(tmp_path / "rescore"))
    model, _ = load_classifier(tmp_path / "whole" / "adapter")
    scores = predict(model.eval(), encode(load_tokenizer(spec.base_path), spec.dev, 32), spec.task_type)
    alone = classification_metrics(spec.dev.y, scores, spec.task_type, n_bootstrap=0)
    assert whole.return_value["n"] == len(spec.dev.y)
    for key in ("auroc_macro", "accuracy"):
        assert whole.return_value[key] == pytest.approx(alone[key], abs=1e-6), key
    predictions = (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in predictions) == sorted(spec.dev.ids)
    # Rank 1 dies at step 5, inside epoch 2: the group restarts from the epoch-1 checkpoint (step 3).
    name, resumed = run("killed", fail_at_step=5)
    assert (Path(tempfile.gettempdir()) / f"ray_med-failed-{name}").read_text() == "5"
    assert [r["step"] for r in resumed.return_value["history"]] == [3, 6, 9]

    # The final checkpoints hold the same trainable weights, best weights, optimizer and schedule.
    with whole.checkpoint.as_directory() as a, resumed.checkpoint.as_directory() as b:
        sa = torch.load(Path(a) / "trainable.pt", weights_only=True)
        sb = torch.load(Path(b) / "trainable.pt", weights_only=True)
    assert sa["params"].keys() == sb["params"].keys() and sa["params"]
    for key in sa["params"]:
        torch.testing.assert_close(sa["params"][key], sb["params"][key], rtol=0, atol=1e-7)
        torch.testing.assert_close(sa["best"][key], sb["best"][key], rtol=0, atol=1e-7)
    for pid, st in sa["opt"]["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(v, sb["opt"]["state"][pid][k], rtol=0, atol=1e-7)
    assert sa["sched"]["last_epoch"] == sb["sched"]["last_epoch"] == 9
    # So do the exported classifiers, and the metrics are the same.
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole" / "adapter").rglob("*.safetensors"))
    assert files
    for rel in files:
        wa, wb = load_file(tmp_path / "whole" / rel), load_file(tmp_path / "killed" / rel)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-7)
    ma, mb = whole.return_value, resumed.return_value
    assert ma["auroc_macro"] == mb["auroc_macro"] and ma["history"][-1]["train_loss"] == pytest.approx(
        mb["history"][-1]["train_loss"], abs=1e-6)
