"""The sweep job on the shared local Ray: a killed sweep resumes without rerunning its finished trials,
failed trials are recorded while the sweep goes on, and the exported best classifier is exactly the trial's.

The sweep runs in a subprocess connected to the session's cluster, with its storage as a
``file://`` URI (the code path of a cloud bucket); the subprocess is SIGKILLed after its
first trial completes, as a lost driver would be, and the same command is run again.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ray_med.data import read_records
from ray_med.models import build_model, save_pretrained, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_base(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = read_records("pubmedqa", str(shared_data / "pubmedqa/pqal_trainval.json")).records
    tok = train_bpe_tokenizer([r.text for r in records], vocab_size=512)
    return save_pretrained(build_model("tiny-llama", vocab_size=len(tok)), tmp_path_factory.mktemp("base") / "m",
                           tokenizer=tok)


def _args(base: Path, data: Path, storage: str, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "jobs/configs/sweep/tiny.yaml"), f"model_path={base}", f"data_root={data}",
        f"run.storage={storage}", "scheduler.name=none", "search.algorithm=grid", "search.num_samples=1",
        "search.max_concurrent_trials=1",
        "overrides=[domain_adapter=null, train.epochs=2, bootstrap=50, scaling.cpus_per_worker=1]", *extra,
    ]


def _progress(log: str) -> dict[str, str]:
    """trial id -> status, from the job's one line per finished trial."""
    out = {}
    for line in log.splitlines():
        if line.startswith("[sweep] trial "):
            words = line.split()
            out[words[3]] = words[4].rstrip(",")
    return out


def test_a_killed_sweep_resumes_and_exports_the_best_trial(ray_session, tiny_base: Path, shared_data: Path,
                                                           tmp_path: Path, capsys, job_main) -> None:
    storage = f"file://{tmp_path}/store"
    # Two learning rates x two target-module lists, one of which names no module: two trials
    # fail (recorded, the sweep goes on) and two train, one at a time.
    space = "space={train.lr: {choice: [0.003, 0.006]}, adapter.target_modules: {choice: [[q_proj, v_proj], [nope]]}}"
    cmd = [sys.executable, "jobs/sweep.py", *_args(tiny_base, shared_data, storage, space)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "HF_HUB_OFFLINE": "1"}
    first_log = tmp_path / "first.log"
    with first_log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 400
            while "completed" not in _progress(first_log.read_text()).values():
                assert proc.poll() is None, first_log.read_text()[-3000:]
                assert time.monotonic() < deadline, first_log.read_text()[-3000:]
                time.sleep(1)
            time.sleep(3)  # let Tune write the state it saves every second
        finally:
            proc.kill()  # SIGKILL: the driver is gone, and with it its trial actors and Train workers
            proc.wait()
    before = _progress(first_log.read_text())
    finished_before = {t for t, s in before.items() if s in ("completed", "failed")}
    assert "completed" in before.values()

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-4000:]
    assert "[sweep] resuming the sweep" in log
    after = _progress(rerun.stdout)
    assert not finished_before & set(after), (before, after)  # no finished trial ran again

    (run_dir,) = (tmp_path / "store").glob("sweep-*")
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert len(rows) == 4 and {r["trial_id"] for r in rows} == set(before) | set(after)
    by_status: dict[str, list[dict]] = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append(r)
    assert len(by_status["completed"]) == 2 and len(by_status["failed"]) == 2, rows
    for r in by_status["failed"]:
        assert r["adapter.target_modules"] == "[nope]" and "nope" in r["reason"] and "\n" not in r["reason"]
    for r in rows:
        if r["trial_id"] in finished_before:
            assert r["attempts"] == "1"
        assert r["status"] != "failed" or r["best_dev_auroc"] == ""
    assert "| trial | lr | target_modules | best dev AUROC | epochs | status |" in rerun.stdout

    # best/: the best completed trial's classifier, exactly; evaluate.py classify scores it on its test split.
    best = run_dir / "best"
    best_row = max(by_status["completed"], key=lambda r: float(r["best_dev_auroc"]))
    trial = run_dir / "trials" / best_row["trial_id"]
    assert load_file(best / "adapter" / "adapter_model.safetensors").keys() == \
        load_file(trial / "adapter" / "adapter_model.safetensors").keys()
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 50
    assert f"best trial {best_row['trial_id']}" in rerun.stdout
    assert (run_dir / "plots" / "epochs.png").stat().st_size > 1000
    assert (run_dir / "plots" / "train_lr.png").is_file()
    serve = (best / "serve.yaml").read_text()
    assert f"pubmedqa_rf: {storage}/{run_dir.name}/best/adapter" in serve

    capsys.readouterr()
    assert job_main("evaluate")(["classify", "--model", str(best), "--max-length", "128", "--bootstrap", "50"]) == 0
    scored = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert scored["n"] == 50 and scored["auroc_macro"] == pytest.approx(metrics["auroc_macro"], abs=1e-6)

    # best/config.yaml is what jobs/finetune.py reproduces: the same classifier, weight for weight.
    assert job_main("finetune")(["--config", str(best / "config.yaml"), f"output_dir={tmp_path}/repro",
                             "scaling.num_workers=0"]) == 0
    again = load_file(tmp_path / "repro" / "adapter" / "adapter_model.safetensors")
    exported = load_file(best / "adapter" / "adapter_model.safetensors")
    assert again.keys() == exported.keys()
    for k in exported:
        assert (again[k] - exported[k]).abs().max() <= 1e-5, k
    assert json.loads((tmp_path / "repro" / "metrics.json").read_text())["auroc_macro"] == pytest.approx(
        metrics["auroc_macro"], abs=1e-6)


def test_a_sweep_whose_every_trial_fails_exits_2_with_the_first_error(ray_session, tiny_base: Path,
                                                                      shared_data: Path, tmp_path: Path,
                                                                      capsys, job_main) -> None:
    code = job_main("sweep")(_args(tiny_base, shared_data, str(tmp_path),
                               "space={adapter.target_modules: {choice: [[nope]]}}"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("sweep: error: every trial failed; the first: ")
    assert "nope" in err[-1]
    (run_dir,) = tmp_path.glob("sweep-*")
    assert [r["status"] for r in csv.DictReader((run_dir / "trials.csv").open())] == ["failed"]


def test_an_unknown_key_in_the_space_fails_before_any_trial(tmp_path: Path, capsys, job_main) -> None:
    code = job_main("sweep")(["--config", str(REPO / "jobs/configs/sweep/tiny.yaml"), f"run.storage={tmp_path}",
                          "space={adapter.rank: {choice: [4, 8]}}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sweep: error: space.adapter.rank: unknown config key 'adapter.rank'")
    assert "Valid keys under 'adapter'" in last
    assert not list(tmp_path.glob("sweep-*/tune"))  # no trial, no Tune experiment
