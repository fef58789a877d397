"""The demo pipeline end to end on the real data, on the shared local Ray: every stage, then cached reruns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ray_med.data import read_records, tokenize_texts

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _attempts(run_dir: Path) -> int:
    """How many times a stage's job really ran (each run appends an attempt to its run.json)."""
    return len(json.loads((run_dir / "run.json").read_text())["attempts"])


def test_pipeline_runs_every_stage_then_reuses_them(job_main, ray_session, shared_data, tiny_stage_overrides, tmp_path,
                                                    capsys) -> None:
    args = [
        "--config", str(REPO / "jobs/configs/pipeline/tiny.yaml"),
        f"run.storage={tmp_path}", f"corpus.root={shared_data}", "tokenizer.vocab_size=1024",
        *tiny_stage_overrides,
    ]
    code = job_main("pipeline")(args)
    out = capsys.readouterr().out
    assert code == 0
    assert "run folder:" in out and "| abstracts |" in out

    (data_dir,) = tmp_path.glob("corpus-*")
    report = json.loads((data_dir / "data_report.json").read_text())
    src = report["sources"]

    # PubMedQA PQA-L: 500 expert-labelled abstracts, all text.
    assert src["abstracts"]["records"] == 500 and src["abstracts"]["text_records"] == 500
    assert src["abstracts"]["images"] == 0
    # MTSamples: 400 notes, the empty transcriptions counted and skipped (on_error: skip).
    clinical = src["clinical"]
    # The file has 401 rows (ids 0-400); 4 transcriptions are empty.
    assert clinical["skipped"] == 4 and clinical["records"] == 397
    assert all("empty transcription" in r for r in clinical["skip_reasons"])
    # PneumoniaMNIST: 2428 train + 270 val images, no text.
    assert src["xray"]["records"] == src["xray"]["images"] == 2698
    assert src["xray"]["tokens"] == 0

    # The tokenizer is an HF folder that plain transformers loads.
    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    assert len(tok) == report["tokenizer"]["vocab_size"] <= 1024
    text = "Pneumonia: 5 mg/kg amoxicillin, T 38.5°C."
    assert tok.decode(tok(text)["input_ids"]) == text

    # Token counts from Ray Data match a direct count on the driver.
    abstracts = read_records("pubmedqa", str(shared_data / "pubmedqa/pqal_trainval.json")).records
    direct = sum(len(ids) for ids in tokenize_texts(tok, [r.text for r in abstracts]))
    assert src["abstracts"]["tokens"] == direct
    assert src["abstracts"]["sequences"] == direct // report["seq_len"]

    # The corpus is written as Parquet in the uniform schema, readable by the parquet reader.
    back = read_records("parquet", str(data_dir / "corpus" / "clinical.parquet")).records
    assert len(back) == clinical["records"] and back[0].label
    assert (data_dir / "config.yaml").is_file() and (data_dir / "data_report.md").is_file()

    # The pretraining stage ran its own job config on the same data and storage, with the
    # tokenizer the data stage trained (the model's tokenizer is that one).
    (pre_dir,) = tmp_path.glob("pretrain-*")
    assert "pretraining finished at step 4" in out
    assert (pre_dir / "model" / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(pre_dir / "model").get_vocab() == tok.get_vocab()
    assert "held-out perplexity, step 0 -> step 4" in out and "| abstracts |" in out.split("held-out")[1]

    # Stage 1 and stage 2 of adapter fine-tuning ran on that model, the domain adapter stacked.
    (domain_dir,) = tmp_path.glob("finetune-domain-*")
    assert (domain_dir / "adapter" / "adapter_config.json").is_file()
    assert "domain adaptation finished at step 4" in out
    (down_dir,) = [p for p in tmp_path.glob("finetune-*") if not p.name.startswith("finetune-domain-")]
    metrics = json.loads((down_dir / "metrics.json").read_text())
    assert metrics["task"] == "pubmedqa_rf" and metrics["n"] == 50
    assert (down_dir / "adapter" / "domain" / "adapter_config.json").is_file()  # trained stage-1 adapter
    assert (down_dir / "plots" / "epochs.png").stat().st_size > 1000
    assert "pubmedqa_rf test metrics (50 examples" in out and "| auroc_macro |" in out

    # The serve stage deployed this run's model, domain adapter and classifier and got an
    # answer from every endpoint; it wrote the filled-in Serve config for `serve run`.
    assert "== stage: serve ==" in out
    served = out.split("== stage: serve ==")[1]
    for endpoint in ("/healthz", "/v1/models", "/v1/qa", "/v1/classify", "/v1/generate", "/v1/chat/completions",
                     "/v1/completions"):
        assert endpoint in served
    assert "HTTP " not in served  # every request got a 200
    for mode in ("top_token:", "cot:", "sc_cot:"):
        assert mode in served
    assert "pubmedqa_rf: " in served and "mtsamples (lora)" in served
    serve_yaml = tmp_path / "serve_tiny.yaml"
    from ray_med.serving.deploy import read_serve_config

    serve_args = read_serve_config(serve_yaml)["applications"][0]["args"]
    assert serve_args["model"] == str(pre_dir / "model")
    assert serve_args["classifiers"]["pubmedqa_rf"] == str(down_dir / "adapter")

    # The sweep stage tuned the same classifier on Ray Tune (2 trials, ASHA); its best trial was
    # exported in the classifier format and the serve stage served it beside the stage-2 one.
    (sweep_dir,) = tmp_path.glob("sweep-*")
    trials = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert len(trials) == 2 and {t["status"] for t in trials} <= {"completed", "early_stopped", "stopped"}
    assert sum(int(t["epochs_run"]) for t in trials) <= 4  # ASHA may stop one after epoch 1
    assert (sweep_dir / "best" / "adapter" / "classifier.json").is_file()
    assert "best trial " in out.split("== stage: sweep ==")[1] and "| trial | lr | r |" in out
    assert serve_args["classifiers"]["pubmedqa_rf_sweep"] == str(sweep_dir / "best" / "adapter")
    assert "pubmedqa_rf_sweep: " in served

    # The multimodal stage put the pretrained LM under a vision tower, scored the held-out
    # X-rays, and the serve_vlm stage sent a real chest X-ray to every image endpoint.
    (mm_dir,) = tmp_path.glob("multimodal-*")
    mm = json.loads((mm_dir / "metrics.json").read_text())
    assert mm["steps"] == 2 and mm["eval"]["pneumonia"]["n"] == 40
    assert json.loads((mm_dir / "run.json").read_text())["inputs"] == {"model.language_model": pre_dir.name}
    assert "| pneumonia | 40 |" in out
    vlm_served = out.split("== stage: serve_vlm ==")[1]
    for endpoint in ("/v1/generate", "/v1/chat/completions", "/v1/classify"):
        assert endpoint in vlm_served
    assert "HTTP " not in vlm_served and "gold label" in vlm_served

    # summary.json ties the stages' folders together; each stage's run.json records its lineage.
    (pipe_dir,) = tmp_path.glob("pipeline-*")
    summary = json.loads((pipe_dir / "summary.json").read_text())["stages"]
    assert [summary[s]["run"] for s in ("data", "pretrain", "domain", "downstream")] == [
        data_dir.name, pre_dir.name, domain_dir.name, down_dir.name]
    assert not any(s["cached"] for s in summary.values())
    lineage = json.loads((down_dir / "run.json").read_text())["inputs"]
    assert lineage == {"model.path": pre_dir.name, "domain_adapter": domain_dir.name}
    stages = {"data": data_dir, "pretrain": pre_dir, "domain": domain_dir, "downstream": down_dir}
    assert all(_attempts(d) == 1 for d in stages.values())
    trained = (pre_dir / "metrics.json").stat().st_mtime_ns

    # The same command again: every stage is reused, none runs (no new attempt is recorded,
    # no training step is taken), and the same tables are printed.
    assert job_main("pipeline")(args) == 0
    again = capsys.readouterr().out
    assert again.count("cached: ") == 10 and "pretraining finished" not in again
    assert "| trial | lr | r |" in again.split("== stage: sweep ==")[1]
    assert "| pneumonia | 40 |" in again and "gold label" in again.split("== stage: serve_vlm ==")[1]
    assert "| abstracts |" in again and "pubmedqa_rf test metrics (50 examples" in again
    federated = again.split("== stage: federated ==")[1]
    assert "| 2 | 5/5 | 0 | image " in federated and "tabular test: macro AUROC" in federated
    # The injection stage reads the federation's encoders; cached, it prints its table and the gate again.
    inject = again.split("== stage: inject ==")[1]
    assert "| pneumonia (seen) |" in inject and "| normal_cxr (unseen) |" in inject
    assert "gate breast_cancer: entropy" in inject and "expert usage [" in inject
    assert all(_attempts(d) == 1 for d in stages.values())
    assert (pre_dir / "metrics.json").stat().st_mtime_ns == trained

    # A changed override of the downstream stage reruns it (and what comes after it), nothing before.
    changed = [a.replace("train.epochs=1", "train.epochs=2") for a in args]
    changed += ["serve.enabled=false", "serve_vlm.enabled=false", "federated.enabled=false", "inject.enabled=false"]
    assert job_main("pipeline")(changed) == 0
    third = capsys.readouterr().out
    for stage in ("data", "pretrain", "domain"):
        assert f"== stage: {stage} ==\ncached: " in third
    assert "== stage: downstream ==\ncached" not in third
    assert all(_attempts(d) == 1 for d in stages.values())
    new_down = [p for p in tmp_path.glob("finetune-*") if not p.name.startswith("finetune-domain-") and p != down_dir]
    assert len(new_down) == 1 and _attempts(new_down[0]) == 1
    assert len(json.loads((new_down[0] / "metrics.json").read_text())["history"]) == 2

    # The run index lists every run with its status and lineage.
    from ray_med.config import from_dict
    from ray_med.runs import RunsConfig, list_runs

    rows = {r["run"]: r for r in list_runs(from_dict(RunsConfig, {"run": {"storage": str(tmp_path)}}))}
    assert rows[pre_dir.name]["status"] == "finished" and rows[pre_dir.name]["job"] == "pretrain"
    assert rows[new_down[0].name]["inputs"]["model.path"] == pre_dir.name
