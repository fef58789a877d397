"""jobs/inject.py end to end on the shared tiny_multimodal federated run: M3OE, FedPlug, FedPlugL, interleaved rounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ray_med.adapters.registry import adapter_type

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow]
SEEN = {"pneumonia", "breast_cancer", "urology_note"}
UNSEEN = {"lung_infection", "normal_cxr", "benign_mass"}


def _inject(job_main, tmp_path: Path, fed: Path, config: str, *extra: str) -> Path:
    args = ["--config", str(REPO / "jobs/configs/inject" / config), f"run.storage={tmp_path}",
            f"federated.global_dir={fed / 'global'}", "bootstrap=50", *extra]
    assert job_main("inject")(args) == 0
    (run,) = tmp_path.glob("inject-*")
    return run


@pytest.fixture(scope="module")
def m3oe_run(job_main, federated_multimodal, tmp_path_factory) -> tuple[Path, str]:
    """One M3OE injection on a real Ray Train worker (shared by the job, evaluation and serving tests)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run = _inject(job_main, tmp_path_factory.mktemp("m3oe"), federated_multimodal, "tiny_m3oe.yaml", "train.epochs=2",
                      "scaling.num_workers=1")
    return run, buf.getvalue()


def test_m3oe_injection_scores_seen_and_unseen_tasks_and_folds_each_task(job_main, m3oe_run, capsys) -> None:
    run, out = m3oe_run
    assert "normal_cxr (unseen) test: macro AUROC" in out and "gate pneumonia: entropy" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]) == SEEN | UNSEEN and set(metrics["unseen"]) == UNSEEN
    # The federation's 7:1:1:1 split of each file: the public rows train, the test rows report.
    assert metrics["n_train"] == {"pneumonia": 242, "breast_cancer": 58, "urology_note": 39}
    assert metrics["test"]["pneumonia"]["n"] == metrics["test"]["normal_cxr"]["n"] == 242
    assert all(0.0 <= m["auroc_macro"] <= 1.0 for m in metrics["test"].values())
    assert metrics["steps"] > 0 and metrics["best_dev"] is not None
    # The gate is recorded per task: usage is a distribution over the experts.
    gate = json.loads((run / "gate_stats.json").read_text())
    assert set(gate) == SEEN | UNSEEN
    for g in gate.values():
        assert len(g["usage"]) == 4 and math.isclose(sum(g["usage"]), 1.0, abs_tol=1e-5)
        assert 0.0 <= g["entropy"] <= math.log(4) + 1e-6
    assert adapter_type(run / "adapter") == "M3OE"
    assert all(adapter_type(run / "folded" / t) == "LORA" for t in SEEN | UNSEEN)
    # evaluate.py multimodal on the saved folder: the live gate and the folded LoRA give the same numbers.
    data = "pkg://sklearn/datasets/data/breast_cancer.csv"
    lines = []
    for adapter in (run / "adapter", run / "folded" / "benign_mass"):
        assert job_main("evaluate")(["multimodal", "--model", str(run / "model"), "--adapter", str(adapter),
                                  "--task", "benign_mass", "--data", data, "--format",
                                  "breast_cancer_csv", "--limit", "80", "--bootstrap", "20"]) == 0
        lines.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert lines[0]["n"] == 80 and lines[0]["seen"] is False
    assert lines[0]["auroc_macro"] == pytest.approx(lines[1]["auroc_macro"], abs=1e-6)
    assert lines[0]["accuracy"] == lines[1]["accuracy"]


def _png(shared_data: Path, index: int) -> bytes:
    import io

    from PIL import Image

    x = np.load(shared_data / "pneumoniamnist/pneumoniamnist_trainval.npz")["val_images"][index]
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def test_serving_an_injected_task_folded_answers_as_the_live_gate(m3oe_run, shared_data) -> None:
    import base64

    import requests
    from ray import serve

    from ray_med.injection.engine import InjectedEngine
    from ray_med.runtime import free_port
    from ray_med.serving.app import build_app

    run, _ = m3oe_run
    live_args = {"model": str(run / "model"), "adapter": str(run / "adapter"), "max_new_tokens": 8}
    folded_args = {"model": str(run / "model"), "gate": "folded", "folded_dir": str(run / "folded"),
                   "max_new_tokens": 8, "lm": {"max_adapters": 1}}  # one cached LoRA: switching tasks evicts
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(live_args), name="live", route_prefix="/live")
        serve.run(build_app(folded_args), name="folded", route_prefix="/folded")
        url = f"http://127.0.0.1:{port}"
        engine = InjectedEngine(str(run / "model"), str(run / "adapter"))  # in process, the live gate
        pngs = [base64.b64encode(_png(shared_data, i)).decode() for i in range(3)]
        for task in ("pneumonia", "normal_cxr", "pneumonia"):
            for png in pngs:
                body = {"task": task, "modality": "image", "image": png}
                a = requests.post(f"{url}/live/v1/classify", json=body, timeout=60).json()
                b = requests.post(f"{url}/folded/v1/classify", json=body, timeout=60).json()
                ref = engine.classify(task, "image", image=base64.b64decode(png))
                assert a["gate"] == "live" and b["gate"] == "folded" and a["label"] == b["label"] == ref["label"]
                for word, p in ref["probabilities"].items():
                    assert a["probabilities"][word] == pytest.approx(p, abs=1e-5)
                    assert b["probabilities"][word] == pytest.approx(p, abs=1e-5)
        row = [float(v) for v in np.random.default_rng(0).normal(10, 3, 30)]
        gen = {"task": "benign_mass", "features": row, "max_new_tokens": 3}
        a = requests.post(f"{url}/live/v1/generate", json=gen, timeout=60)
        b = requests.post(f"{url}/folded/v1/generate", json=gen, timeout=60)
        assert a.status_code == b.status_code == 200 and a.json()["text"] == b.json()["text"]
        assert a.json()["task"] == "benign_mass"
        models = requests.get(f"{url}/live/v1/models", timeout=30).json()["data"][0]
        assert models["kind"] == "injected" and models["tasks"]["normal_cxr"] == {"modality": "image", "seen": False}
        # Bad requests are 4xx JSON errors naming the fix.
        bad = [({"task": "nope", "image": pngs[0]}, 404, "unknown task"),
               ({"task": "pneumonia", "modality": "tabular", "image": pngs[0]}, 422, "reads image inputs"),
               ({"task": "breast_cancer", "features": [1.0, 2.0]}, 422, "features must be 30 numbers"),
               ({"task": "pneumonia", "features": row}, 422, "send image"),
               ({"image": pngs[0]}, 422, "send task")]
        for body, status, needle in bad:
            r = requests.post(f"{url}/live/v1/classify", json=body, timeout=60)
            assert r.status_code == status and needle in r.json()["error"]["message"], (body, r.text)
    finally:
        serve.shutdown()


def test_fedplug_and_fedplugl_train_at_the_m3oe_budget(job_main, federated_multimodal, tmp_path) -> None:
    common = ["train.max_steps=3", "scaling.num_workers=0", "unseen=[]"]
    plug = json.loads((_inject(job_main, tmp_path / "a", federated_multimodal, "tiny_fedplug.yaml", *common)
                       / "metrics.json").read_text())
    assert plug["adapter_params"] == 0 and plug["adapter_dir"] is None and plug["gate"] == {}
    run = _inject(job_main, tmp_path / "b", federated_multimodal, "tiny_fedplugl.yaml", *common)
    lora = json.loads((run / "metrics.json").read_text())
    assert adapter_type(run / "adapter") == "LORA"
    # The LoRA's rank is chosen so its parameters come as close as a rank can to M3OE's budget.
    per_rank = lora["adapter_params"] / lora["lora_rank"]
    assert abs(lora["adapter_params"] - lora["m3oe_budget"]) <= per_rank / 2
    assert lora["trainable"] - lora["adapter_params"] == plug["trainable"]  # the same projectors


def test_two_workers_train_in_lockstep_and_score_once(job_main, federated_multimodal, tmp_path) -> None:
    # 339 public items, batch 16: each of the 2 ranks takes every 2nd batch of the seeded plan (DDP).
    run = _inject(job_main, tmp_path, federated_multimodal, "tiny_m3oe.yaml", "train.max_steps=4", "scaling.num_workers=2",
                  "bootstrap=20")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["steps"] == 4
    # Rank 0 alone scores test, every item once.
    assert metrics["test"]["pneumonia"]["n"] == 242 and metrics["test"]["breast_cancer"]["n"] == 57
    assert adapter_type(run / "adapter") == "M3OE"


def test_interleaved_rounds_alternate_federated_rounds_and_injection_epochs(job_main, shared_data, ray_session, tmp_path,
                                                                             capsys) -> None:
    fed = REPO / "jobs/configs/federated/tiny_multimodal.yaml"
    args = ["--config", str(REPO / "jobs/configs/inject/tiny_m3oe.yaml"), f"run.storage={tmp_path}",
            "rounds_interleaved=true", f"federated.config={fed}",
            f"federated.overrides=[rounds=2, bootstrap=10, data_root={shared_data}]", "bootstrap=20",
            "scaling.num_workers=0", "unseen=[]", "train.batch_size=32"]
    assert job_main("inject")(args) == 0
    out = capsys.readouterr().out
    assert "[inject] round 1/2" in out and "[inject] round 2/2" in out
    (run,) = tmp_path.glob("inject-*")
    rounds = json.loads((run / "federated" / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [1, 2]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rounds"] == 2 and set(metrics["test"]) == SEEN
    # The second epoch started from the first's projectors and adapter, not a fresh init.
    assert out.count("starting from the previous epoch's projectors and adapter") == 1
    assert np.isfinite(metrics["best_dev"])


def test_bad_input_fails_before_any_worker_in_one_line(job_main, federated_multimodal, tmp_path, capsys) -> None:
    base = ["--config", str(REPO / "jobs/configs/inject/tiny_m3oe.yaml"), f"run.storage={tmp_path}"]
    fed = f"federated.global_dir={federated_multimodal / 'global'}"
    cases = [
        ([f"federated.global_dir={tmp_path / 'nowhere'}"], "not found (a federated run's <output_dir>/global)"),
        ([], "set federated.global_dir"),
        ([fed, "method=moe"], "method must be one of m3oe, fedplug, fedplugl"),
        ([fed, "adapter.gate_inputs=tasks"], "gate_inputs"),
        ([fed, "tasks.0.answers={normal: 'no', sick: 'yes'}"], "no word for the labels ['pneumonia']"),
        ([fed, "unseen.0.description=Pneumonia detection from a chest X-ray"], "never appear in training"),
    ]
    for extra, message in cases:
        assert job_main("inject")(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), (extra, err[-1])
