"""The multimodal job end to end on the shared local Ray, on real PneumoniaMNIST and PubMedQA.

Two workers train the tiny model on the task mixture; one run loses a worker mid-run and
resumes from its checkpoint, and must end with exactly the weights of the run that did
not. The saved folder loads with plain transformers, and ``evaluate.py multimodal``
rescoring the held-out split gives the job's own numbers. Bad input fails before any
worker starts, with one line and exit code 2.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "jobs/configs/multimodal/tiny_pneumonia.yaml")


def _args(shared_data: Path, tmp_path: Path, out: str, *extra: str) -> list[str]:
    return ["--config", CONFIG, f"data_root={shared_data}", f"run.storage={tmp_path}/runs", f"output_dir={tmp_path}/{out}",
            "tasks.0.limit=96", "tasks.1.limit=32", "train.max_steps=6", "train.eval_every=3", "train.batch_size=8",
            "train.log_every=3", "train.max_length=160", "bootstrap=50", "scaling.num_workers=2", *extra]


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_resume_exactly_and_the_saved_model_is_plain_transformers(ray_session, shared_data, tmp_path,
                                                                            capsys, job_main) -> None:
    name = f"mm-fault-{uuid.uuid4().hex[:6]}"
    assert job_main("multimodal")(_args(shared_data, tmp_path, "clean")) == 0
    assert job_main("multimodal")(_args(shared_data, tmp_path, "faulted", "train.fail_at_step=4", f"run.name={name}")) == 0
    clean, faulted = tmp_path / "clean", tmp_path / "faulted"
    # rank 1 really died at step 4; the group restarted from the step-3 checkpoint
    assert (Path(tempfile.gettempdir()) / f"ray_med-failed-{name}").read_text() == "4"
    a, b = load_file(clean / "model/model.safetensors"), load_file(faulted / "model/model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the resume lost nothing

    metrics = json.loads((clean / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["steps"] == 6 and metrics["monitor"] == "dev_pneumonia_auroc"
    held = metrics["eval"]["pneumonia"]
    assert held["n"] == 270 and 0.0 <= held["auroc_macro"] <= 1.0 and len(held["auroc_ci"]) == 2

    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(clean / "model"))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert AutoProcessor.from_pretrained(str(clean / "model")).image_token == "<image>"

    # evaluate.py multimodal on the held-out split (a file of several splits: --split picks one)
    capsys.readouterr()
    assert job_main("evaluate")(["multimodal", "--model", str(clean / "model"), "--task", "pneumonia", "--format",
                             "medmnist", "--data", str(shared_data / "pneumoniamnist/pneumoniamnist_trainval.npz"),
                             "--split", "val", "--bootstrap", "50", "--max-length", "160"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"auroc_macro", "auroc_ci", "accuracy", "f1_macro", "n"} <= set(line) and line["n"] == 270
    assert line["auroc_macro"] == pytest.approx(held["auroc_macro"], abs=1e-6)
    preds = [json.loads(x) for x in Path(line["predictions"]).read_text().splitlines()]
    assert len(preds) == 270 and set(preds[0]["probabilities"]) == {"normal", "pneumonia"}


def test_bad_input_is_one_line_and_exit_2(shared_data, tmp_path, capsys, job_main) -> None:
    cases = [
        (["tasks.0.task=pneumona"], "unknown multimodal task 'pneumona'. Did you mean 'pneumonia'?"),
        (["tasks.0.path=nowhere.npz"], "pneumonia: data file not found"),
        ([f"model.path={tmp_path}", "model.preset=null"], "not a multimodal (LLaVA) model folder"),
        (["model.phase=everything"], "model.phase must be one of projector, full, lora"),
        (["train.batch_size=1"], "cannot hold mixture.min_per_task_per_batch"),
    ]
    for extra, message in cases:
        assert job_main("multimodal")(_args(shared_data, tmp_path, "bad", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_evaluate_refuses_to_score_a_file_of_several_splits_without_split(shared_data, tmp_path, capsys, job_main) -> None:
    npz = str(shared_data / "pneumoniamnist/pneumoniamnist_trainval.npz")
    for extra, message in [
        ([], "holds the splits ['train', 'val']: pick the one to score with --split"),
        (["--split", "test"], "split 'test' not in the file"),
        (["--task", "pneumona"], "Did you mean 'pneumonia'?"),
    ]:
        args = ["multimodal", "--model", str(tmp_path), "--task", "pneumonia", "--format", "medmnist", "--data", npz]
        assert job_main("evaluate")(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err)
