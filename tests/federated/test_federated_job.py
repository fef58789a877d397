"""The federated job on the shared local Ray, on real PneumoniaMNIST: rounds, outputs, faults, resume, privacy, scale."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
CONFIG = "jobs/configs/federated/tiny_pneumonia_fedavg.yaml"
NPZ = "pneumoniamnist/pneumoniamnist_trainval.npz"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _args(storage: Path, shared: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / CONFIG), f"run.storage={storage}", f"data_root={shared}", "rounds=3",
            "bootstrap=50", *extra]


def _run_dir(storage: Path) -> Path:
    (d,) = storage.glob("federated-*")
    return d


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "global" / "image" / "model.safetensors"))


def test_fedavg_rounds_outputs_evaluation_and_rerun(job_main, ray_session, shared_data, tmp_path, capsys) -> None:
    assert job_main("federated")(_args(tmp_path, shared_data)) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("[federated] round")]
    assert len(lines) == 3 and all("5/5 clients" in ln and "dev image auroc" in ln for ln in lines)
    run = _run_dir(tmp_path)
    rounds = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [1, 2, 3]
    assert all(len(r["participants"]) == 5 and not r["dropped"] for r in rounds["rounds"])
    assert all(r["round_s"] > 0 and r["client_compute_s"] > 0 for r in rounds["rounds"])
    # Dirichlet(0.5) label skew over the 1,700 private rows of 2,428 (7:1:1:1).
    assert sum(rounds["sizes"]["image"].values()) == 1700 and len(set(rounds["sizes"]["image"].values())) == 5
    assert 0.0 <= rounds["test"]["image"]["auroc_macro"] <= 1.0 and rounds["test"]["image"]["n"] == 242
    assert (run / "plots" / "dev_auroc.png").stat().st_size > 1000
    cfg = json.loads((run / "global" / "image" / "config.json").read_text())
    assert cfg["tasks"] == {"pneumonia": ["normal", "pneumonia"]} and cfg["round"] == 3

    # evaluate.py federated on the held-out val split: the last stdout line is one JSON object.
    ev = job_main("evaluate")(["federated", "--model", str(run / "global"), "--modality", "image", "--task", "pneumonia",
                            "--data", str(shared_data / NPZ), "--format", "medmnist", "--split", "val",
                            "--bootstrap", "50"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev == 0 and last["n"] == 270 and {"auroc_macro", "auroc_ci", "accuracy"} <= set(last)
    # Without --split, a file holding two splits is refused in one line.
    assert job_main("evaluate")(["federated", "--model", str(run / "global"), "--task", "pneumonia",
                              "--data", str(shared_data / NPZ), "--format", "medmnist"]) == 2
    assert "pick the one to score with --split" in capsys.readouterr().err

    # The same command again: the checkpoint says every round is done; nothing is retrained.
    before = _weights(run)
    assert job_main("federated")(_args(tmp_path, shared_data)) == 0
    again = capsys.readouterr().out
    assert "resumed after round 3" in again and "[federated] round" not in again
    after = _weights(run)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_killed_client_actor_is_dropped_then_readmitted(job_main, ray_session, shared_data, tmp_path, capsys) -> None:
    # The executor running client_0002 in round 2 dies (os._exit, as a kill): Ray restarts it.
    assert job_main("federated")(_args(tmp_path, shared_data, "crash_client=client_0002@2", "clients.min_per_round=3",
                                    "pool.max_restarts=2")) == 0
    rows = json.loads((_run_dir(tmp_path) / "rounds.json").read_text())["rounds"]
    assert "client_0002" in rows[0]["participants"]
    assert "client_0002" not in rows[1]["participants"] and len(rows[1]["participants"]) == 4
    assert rows[1]["dropped"]["client_0002"].startswith("executor failed")
    assert "client_0002" in rows[2]["participants"] and len(rows[2]["participants"]) == 5, rows[2]["dropped"]


def test_malformed_client_data_fails_its_own_rounds_only(job_main, ray_session, shared_data, tmp_path) -> None:
    assert job_main("federated")(_args(tmp_path, shared_data, "fail_client=client_0001", "rounds=2")) == 0
    rows = json.loads((_run_dir(tmp_path) / "rounds.json").read_text())["rounds"]
    assert all("malformed rows" in r["dropped"]["client_0001"] and len(r["participants"]) == 4 for r in rows)


def test_killed_driver_resumes_at_the_saved_round_with_the_same_weights(job_main, ray_session, shared_data, tmp_path,
                                                                         capsys) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert job_main("federated")(_args(whole, shared_data, "rounds=4")) == 0
    # The same run in its own process, killed (SIGKILL, its embedded Ray with it) after round 2's checkpoint.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "jobs/federated.py", *_args(cut, shared_data, "rounds=4"),
                             "hold_after_round=2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "holding after round 2" in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert any("holding after round 2" in ln for ln in seen), "".join(seen[-20:])
    capsys.readouterr()
    # The exact command again (the hook holds only after a round 2 it now never runs).
    assert job_main("federated")([*_args(cut, shared_data, "rounds=4"), "hold_after_round=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed after round 2" in out
    assert [ln.split(":")[0] for ln in out.splitlines() if ln.startswith("[federated] round")] == [
        "[federated] round   3", "[federated] round   4"]
    a, b = _weights(_run_dir(whole)), _weights(_run_dir(cut))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_secure_aggregation_gives_the_plain_sum_even_with_a_dropout(job_main, ray_session, shared_data, tmp_path) -> None:
    # client_0003 advertises its key, then fails: the survivors reveal their seeds with it.
    common = ("rounds=2", "fail_client=client_0003")
    assert job_main("federated")(_args(tmp_path / "plain", shared_data, *common)) == 0
    assert job_main("federated")(_args(tmp_path / "masked", shared_data, *common, "secagg.enabled=true")) == 0
    plain, masked = _weights(_run_dir(tmp_path / "plain")), _weights(_run_dir(tmp_path / "masked"))
    # Fixed point at 2^-24: the masked federation lands on the same weights to ~1e-6.
    assert all(np.allclose(plain[k], masked[k], atol=1e-5) for k in plain)
    rows = json.loads((_run_dir(tmp_path / "masked") / "rounds.json").read_text())["rounds"]
    assert all("client_0003" in r["dropped"] and len(r["participants"]) == 4 for r in rows)


def test_client_level_dp_accounts_epsilon_and_stops_at_the_budget(job_main, ray_session, shared_data, tmp_path, capsys) -> None:
    assert job_main("federated")(_args(tmp_path, shared_data, "rounds=5", "clients.fraction=0.6",
                                    "dp.enabled=true", "dp.clip=0.5", "dp.noise_multiplier=1.0",
                                    "dp.max_epsilon=9.0")) == 0
    out = capsys.readouterr().out
    summary = json.loads((_run_dir(tmp_path) / "rounds.json").read_text())
    eps = [r["epsilon"] for r in summary["rounds"]]
    assert len(eps) >= 1 and eps == sorted(eps) and eps[-1] <= 9.0
    assert summary["rounds"][0]["noise_std"]["image"] == pytest.approx(1.0 * 0.5 / (0.6 * 5))
    if len(eps) < 5:  # the budget ended it before round 5, in one line
        assert "stopped: privacy budget" in out and summary["stopped"].startswith("privacy budget")
    assert (_run_dir(tmp_path) / "plots" / "epsilon.png").is_file()


def test_a_thousand_virtual_clients_run_on_the_two_actor_pool(job_main, ray_session, shared_data, tmp_path) -> None:
    assert job_main("federated")(_args(tmp_path, shared_data, "rounds=1", "clients.count=1000",
                                    "clients.fraction=0.1", "partition.scheme=iid", "local.batch_size=8",
                                    "clients.min_per_round=50")) == 0
    summary = json.loads((_run_dir(tmp_path) / "rounds.json").read_text())
    (row,) = summary["rounds"]
    assert row["sampled"] == 100 and len(row["participants"]) == 100 and not row["dropped"]
    assert len(summary["sizes"]["image"]) == 1000 and min(summary["sizes"]["image"].values()) >= 1
    # Memory is bounded by the pool: two executor processes ran all hundred clients.
    assert row["executors"] == 2 and 0 < row["executor_peak_rss_mb"] < 4096


def test_sites_hold_different_modalities(federated_multimodal) -> None:
    run = federated_multimodal  # tiny_multimodal.yaml, 2 rounds (shared with the injection tests)
    summary = json.loads((run / "rounds.json").read_text())
    assert set(summary["test"]) == {"image", "tabular", "text", "signal"}
    assert sorted(summary["sizes"]["tabular"]) == ["hospital_a", "hospital_c"]
    # Breast cancer is easy for the MLP even after two rounds; every modality's folder loads back.
    assert summary["test"]["tabular"]["auroc_macro"] > 0.9
    from ray_med.federated.models import load_modality

    for mod in ("image", "tabular", "text", "signal"):
        assert load_modality(run / "global" / mod).spec.modality == mod
