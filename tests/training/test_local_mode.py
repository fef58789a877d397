"""A Ray Train worker function run by Ray Train's local mode (``num_workers=0``): in this process, no cluster."""

from __future__ import annotations

from pathlib import Path

from ray_med.config import from_dict
from ray_med.data import read_records
from ray_med.models import build_model, save_pretrained, train_bpe_tokenizer
from ray_med.runtime import RunContext, Storage
from ray_med.tasks import get_task, stratified_split, task_data
from ray_med.training.config import FinetuneConfig
from ray_med.training.downstream_worker import DownstreamSpec, downstream_worker
from ray_med.training.trainer import build_trainer, threads_per_worker

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_downstream_worker_in_local_mode(tmp_path: Path) -> None:
    records = read_records("mimic_outcomes", str(FIXTURES / "mimic_outcomes_mor.csv")).records
    tok = train_bpe_tokenizer([r.text for r in records] * 5, vocab_size=300)
    base = save_pretrained(build_model("tiny-llama", vocab_size=len(tok)), tmp_path / "base", tokenizer=tok)
    cfg = from_dict(FinetuneConfig, {
        "model": {"path": str(base), "preset": None}, "pooling": "last", "bootstrap": 20,
        "adapter": {"r": 4, "alpha": 8}, "data": {"task": "mimic_mor", "dev_size": 2},
        "train": {"epochs": 2, "batch_size": 2, "max_length": 32, "patience": 5},
        "scaling": {"num_workers": 0},
    })
    task = get_task("mimic_mor")
    data = task_data(task, records)
    train_idx, dev_idx = stratified_split(data.y, 2, seed=0)
    spec = DownstreamSpec(cfg=cfg, base_path=str(base), train=data.take(train_idx), dev=data.take(dev_idx),
                          task_type=task.task_type, ordinal=False, out_dir=str(tmp_path / "out"),
                          threads=threads_per_worker(cfg.scaling))
    (tmp_path / "out").mkdir()
    ctx = RunContext(job="finetune", name="local", storage=Storage.parse(str(tmp_path / "runs")))
    result = build_trainer(downstream_worker, {"spec": spec}, scaling=cfg.scaling, ctx=ctx, threads=1).fit()

    # Local mode ran the worker function in this process: no controller, no run folder.
    assert result.path is None and not (tmp_path / "runs").exists()
    metrics = result.return_value
    assert [r["epoch"] for r in metrics["history"]] == [1, 2] and metrics["n"] == 2 and metrics["n_train"] == 4
    assert result.metrics["epoch"] == 2  # the last report reached Ray Train's result
    assert (tmp_path / "out" / "adapter" / "classifier.json").is_file()
    assert (tmp_path / "out" / "plots" / "epochs.png").is_file()
