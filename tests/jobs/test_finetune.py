"""Two-stage adapter fine-tuning end to end on the shared local Ray, on real data.

Stage 1 trains a domain LoRA as a causal LM on MTSamples over a tiny "pretrained" model;
stage 2 stacks it (trainable) under a downstream LoRA with a head on PubMedQA (400 train /
50 dev / 50 test); then `evaluate.py classify` rescores the saved classifier on the test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_med.data import read_records
from ray_med.models import build_model, save_pretrained, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.deepspeed]


def test_domain_then_downstream_then_evaluate(ray_session, shared_data, tmp_path, capsys, job_main) -> None:
    notes = read_records("mtsamples", str(shared_data / "mtsamples/mtsamples_400.csv"), on_error="skip").records
    tok = train_bpe_tokenizer([r.text for r in notes], vocab_size=512)
    base = save_pretrained(build_model("tiny-llama", vocab_size=len(tok)), tmp_path / "base", tokenizer=tok)

    assert job_main("finetune")([
        "--config", str(REPO / "jobs/configs/finetune/tiny_domain.yaml"), f"model.path={base}", "model.preset=null",
        f"corpus.root={shared_data}", f"run.storage={tmp_path}/runs", f"output_dir={tmp_path}/domain",
        "lm.max_steps=6", "lm.log_every=2", "eval.every_steps=6", "eval.max_sequences=4",
        "scaling.num_workers=0",  # Ray Train's local mode; the downstream stage below runs a worker group
    ]) == 0
    domain = tmp_path / "domain" / "adapter"
    assert json.loads((domain / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (domain / "adapter_model.safetensors").is_file()

    out = tmp_path / "downstream"
    assert job_main("finetune")([
        "--config", str(REPO / "jobs/configs/finetune/tiny_downstream.yaml"), f"model.path={base}",
        f"domain_adapter={domain}", f"data.path={shared_data}/pubmedqa/pqal_trainval.json",
        f"run.storage={tmp_path}/runs", f"output_dir={out}", "train.epochs=2", "bootstrap=100", "merge=true",
    ]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 50 and metrics["n_dev"] == 50 and metrics["n_train"] == 400
    splits = json.loads((out / "splits.json").read_text())
    assert splits["n"] == {"train": 400, "dev": 50, "test": 50} and splits["task"] == "pubmedqa_rf"
    assert len(set(splits["train"]) | set(splits["dev"]) | set(splits["test"])) == 500  # disjoint
    assert 0.0 <= metrics["auroc_macro"] <= 1.0 and len(metrics["auroc_macro_ci"]) == 2
    assert metrics["trainable_body"] > 0 and metrics["trainable"] < metrics["total"]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "domain").is_dir()
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 50 and all(len(p["scores"]) == 3 for p in predictions)
    assert [p["id"] for p in predictions] == splits["test"]  # the reported metrics are the test split's

    # The run folder alone: evaluate.py classify takes the task, the file and the test ids from splits.json.
    capsys.readouterr()
    assert job_main("evaluate")(["classify", "--model", str(out), "--max-length", "128", "--bootstrap", "100"]) == 0
    default = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert default["split"] == "test" and default["n"] == 50
    assert default["auroc_macro"] == pytest.approx(metrics["auroc_macro"], abs=1e-6)

    ids = tmp_path / "test_ids.txt"
    ids.write_text("\n".join(p["id"] for p in predictions))
    capsys.readouterr()
    assert job_main("evaluate")([
        "classify", "--model", str(out / "adapter"), "--task", "pubmedqa_rf",
        "--data", str(shared_data / "pubmedqa/pqal_trainval.json"), "--format", "pubmedqa",
        "--ids", str(ids), "--max-length", "128", "--bootstrap", "100",
    ]) == 0
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert offline["n"] == 50
    assert offline["auroc_macro"] == pytest.approx(metrics["auroc_macro"], abs=1e-6)
    assert offline["accuracy"] == pytest.approx(metrics["accuracy"])

    # The merged export (both LoRAs folded into the base weights) scores the same.
    assert (out / "merged" / "model" / "model.safetensors").is_file()
    capsys.readouterr()
    assert job_main("evaluate")([
        "classify", "--model", str(out / "merged"), "--task", "pubmedqa_rf",
        "--data", str(shared_data / "pubmedqa/pqal_trainval.json"), "--ids", str(ids), "--max-length", "128",
        "--bootstrap", "100",
    ]) == 0
    merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert merged["auroc_macro"] == pytest.approx(metrics["auroc_macro"], abs=1e-3)
