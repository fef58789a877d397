"""jobs/inject.py end to end on the shared tiny_multimodal federated run: M3OE, FedPlug, FedPlugL, interleaved rounds."""

from __future__ import annotations

import importlib.util
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


def _main(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _inject(tmp_path: Path, fed: Path, config: str, *extra: str) -> Path:
    args = ["--config", str(REPO / "jobs/configs/inject" / config), f"run.storage={tmp_path}",
            f"federated.global_dir={fed / 'global'}", "bootstrap=50", *extra]
    assert _main("inject")(args) == 0
    (run,) = tmp_path.glob("inject-*")
    return run


def test_m3oe_injection_scores_seen_and_unseen_tasks_and_folds_each_task(federated_multimodal, tmp_path,
                                                                        capsys) -> None:
    run = _inject(tmp_path, federated_multimodal, "tiny_m3oe.yaml", "train.epochs=2", "scaling.num_workers=1")
    out = capsys.readouterr().out
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
    from ray_med.data.config import resolve_path

    lines = []
    for adapter in (run / "adapter", run / "folded" / "benign_mass"):
        assert _main("evaluate")(["multimodal", "--model", str(run / "model"), "--adapter", str(adapter),
                                  "--task", "benign_mass", "--data", resolve_path(data), "--format",
                                  "breast_cancer_csv", "--limit", "80", "--bootstrap", "20"]) == 0
        lines.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert lines[0]["n"] == 80 and lines[0]["seen"] is False
    assert lines[0]["auroc_macro"] == pytest.approx(lines[1]["auroc_macro"], abs=1e-6)
    assert lines[0]["accuracy"] == lines[1]["accuracy"]


def test_fedplug_and_fedplugl_train_at_the_m3oe_budget(federated_multimodal, tmp_path) -> None:
    common = ["train.max_steps=3", "scaling.num_workers=0", "unseen=[]"]
    plug = json.loads((_inject(tmp_path / "a", federated_multimodal, "tiny_fedplug.yaml", *common)
                       / "metrics.json").read_text())
    assert plug["adapter_params"] == 0 and plug["adapter_dir"] is None and plug["gate"] == {}
    run = _inject(tmp_path / "b", federated_multimodal, "tiny_fedplugl.yaml", *common)
    lora = json.loads((run / "metrics.json").read_text())
    assert adapter_type(run / "adapter") == "LORA"
    # The LoRA's rank is chosen so its parameters come as close as a rank can to M3OE's budget.
    per_rank = lora["adapter_params"] / lora["lora_rank"]
    assert abs(lora["adapter_params"] - lora["m3oe_budget"]) <= per_rank / 2
    assert lora["trainable"] - lora["adapter_params"] == plug["trainable"]  # the same projectors


def test_interleaved_rounds_alternate_federated_rounds_and_injection_epochs(shared_data, ray_session, tmp_path,
                                                                             capsys) -> None:
    fed = REPO / "jobs/configs/federated/tiny_multimodal.yaml"
    args = ["--config", str(REPO / "jobs/configs/inject/tiny_m3oe.yaml"), f"run.storage={tmp_path}",
            "rounds_interleaved=true", f"federated.config={fed}",
            f"federated.overrides=[rounds=2, bootstrap=10, data_root={shared_data}]", "bootstrap=20",
            "scaling.num_workers=0", "unseen=[]", "train.batch_size=32"]
    assert _main("inject")(args) == 0
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


def test_bad_input_fails_before_any_worker_in_one_line(federated_multimodal, tmp_path, capsys) -> None:
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
        assert _main("inject")(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), (extra, err[-1])
