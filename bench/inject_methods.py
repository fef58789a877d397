"""M3OE against FedPlug and FedPlugL at the same budget, on real data, over seeds; plus M3OE's two gate ablations.

    python bench/inject_methods.py [--seeds 0 1 2] [--rounds 10] [--out bench/results/inject_methods.json]

One federated run (jobs/configs/federated/tiny_multimodal.yaml: PneumoniaMNIST, the
breast-cancer table, MTSamples notes, and the MIT-BIH-schema fixture, on 5 hospitals)
gives the encoders. Then, for every seed, ``jobs/inject.py`` runs each setting with its
tiny config unchanged (nothing here is tuned to a split): M3OE (gate from both texts),
FedPlug, FedPlugL, and M3OE with the gate from the task text only or the modality text
only. Every number is the test split's macro AUROC (the federation's 7:1:1:1 split;
dev only early-stopped); seen tasks were trained on the public split, unseen ones never.

The result holds, per setting and task, the mean and sd over seeds and each seed's AUROC
with its bootstrap 95% CI, the trainable parameters, and the mean gate entropy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402

SETTINGS = {
    "m3oe": ("tiny_m3oe.yaml", []),
    "fedplug": ("tiny_fedplug.yaml", []),
    "fedplugl": ("tiny_fedplugl.yaml", []),
    "m3oe_task_only": ("tiny_m3oe.yaml", ["adapter.gate_inputs=task_only"]),
    "m3oe_modality_only": ("tiny_m3oe.yaml", ["adapter.gate_inputs=modality_only"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "bench/results/inject_methods.json"))
    args = p.parse_args()

    import ray

    from ray_med.config import load_config
    from ray_med.registry import execute, get_job

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="inject-bench-")
    fed_job = get_job("federated")
    fed_cfg = load_config(fed_job.config, REPO / "jobs/configs/federated/tiny_multimodal.yaml",
                          [f"run.storage={storage}", f"data_root={args.data_root}", f"rounds={args.rounds}",
                           "bootstrap=200"])
    fed = execute(fed_job, fed_cfg)
    job = get_job("inject")
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for name, (config, extra) in SETTINGS.items():
            cfg = load_config(job.config, REPO / "jobs/configs/inject" / config,
                              [f"run.storage={storage}", f"run.seed={seed}", f"federated.global_dir={fed.global_dir}",
                               "scaling.num_workers=0", *extra])
            out = execute(job, cfg)
            m = out.metrics
            runs[name].append({"seed": seed, "best_dev": m["best_dev"], "steps": m["steps"],
                               "trainable": m["trainable"], "adapter_params": m["adapter_params"],
                               "test": {t: {"auroc": v["auroc_macro"], "ci": v["auroc_macro_ci"], "seen": v["seen"],
                                            "n": v["n"], "accuracy": v["accuracy"]} for t, v in m["test"].items()},
                               "gate_entropy": {t: g["entropy"] for t, g in m.get("gate", {}).items()}})
            print(f"[bench] seed {seed} {name}: " + ", ".join(f"{t} {v['auroc_macro']:.3f}"
                                                              for t, v in m["test"].items()), flush=True)
    table = {}
    for name, rs in runs.items():
        tasks = rs[0]["test"]
        row = {}
        for t in tasks:
            vals = [r["test"][t]["auroc"] for r in rs]
            row[t] = {"mean": round(statistics.mean(vals), 4),
                      "sd": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
                      "seen": tasks[t]["seen"], "per_seed": [round(v, 4) for v in vals]}
        seen = [row[t]["mean"] for t in row if row[t]["seen"]]
        unseen = [row[t]["mean"] for t in row if not row[t]["seen"]]
        table[name] = {"tasks": row, "seen_mean": round(statistics.mean(seen), 4),
                       "unseen_mean": round(statistics.mean(unseen), 4) if unseen else None,
                       "adapter_params": rs[0]["adapter_params"], "trainable": rs[0]["trainable"]}
    result = {"bench": "inject_methods", "machine": "2-core CPU, no GPU", "seeds": args.seeds,
              "federated_rounds": args.rounds, "federated_test": {m: round(v["auroc_macro"], 4)
                                                                  for m, v in fed.test.items()},
              "metric": "test macro AUROC (federation's 7:1:1:1 test split; dev early-stops)",
              "table": table, "runs": runs, "wall_s": round(time.perf_counter() - t0, 1)}
    write_result(result, args.out)
    ray.shutdown()


if __name__ == "__main__":
    main()
