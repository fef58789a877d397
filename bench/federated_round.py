"""Federated round time against the clients' pure compute, and a 1,000-client round's memory.

(a) The federated job (jobs/configs/federated/tiny_pneumonia_fedavg.yaml on the real
    PneumoniaMNIST, --clients clients, every one sampled each round, IID, --local-epochs
    local epochs, a pool of 2 executor actors on an embedded 2-CPU Ray). Its round time
    is ``fit_s`` of rounds.json: sampling, dispatch to the actors, the clients' training,
    aggregation and the server step (not the dev scoring after it); round 1 is left out
    (actors starting, data read once per actor).
(b) The clients' pure compute: the same local training (``client.fit_client`` on each
    client's rows of the job's own plan, one torch thread as in an executor) called in this
    process one client after another, summed and divided by the parallelism (2 executors);
    the median of 3 passes after a warm-up pass.

``round_vs_compute_ratio`` is a/b for each repeat (median, min, max over --repeats);
1.0 would mean Ray adds nothing to the clients' own work. Then one round of --scale-clients
virtual clients (10% sampled) runs in its own process: its round time, the driver's peak
RSS and the executors' peak RSS (memory is bounded by the pool, not the client count).

Writes bench/results/federated_round.json (or --out); the last stdout line is that JSON.

    python bench/federated_round.py [--clients 10] [--rounds 4] [--repeats 3] [--scale-clients 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import spread, write_result  # bench/common.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs/configs/federated/tiny_pneumonia_fedavg.yaml"



def overrides(shared: Path, storage: str, clients: int, rounds: int, epochs: int) -> list[str]:
    return [f"data_root={shared}", f"run.storage={storage}", f"clients.count={clients}", "clients.fraction=1.0",
            "clients.min_per_round=1", "partition.scheme=iid", f"rounds={rounds}", f"local.epochs={epochs}",
            "bootstrap=10", "pool.actors=2", "run.num_cpus=2"]


def job_round_times(over: list[str]) -> list[float]:
    from ray_med.cli import run_job

    assert run_job(["--config", str(CONFIG), *over], "federated") == 0
    storage = next(o.split("=", 1)[1] for o in over if o.startswith("run.storage="))
    (run,) = Path(storage).glob("federated-*")
    rows = json.loads((run / "rounds.json").read_text())["rounds"]
    return [r["fit_s"] for r in rows[1:]]


def pure_compute(over: list[str]) -> float:
    """Seconds of local training of every client of one round, in this process, one after another."""
    import torch

    from ray_med.config import load_config
    from ray_med.federated.client import fit_client
    from ray_med.federated.config import FederatedConfig
    from ray_med.federated.data import modality_arrays
    from ray_med.federated.job import data_path, encoder_specs, plan_federation
    from ray_med.federated.models import build_model, trainable_weights

    cfg = load_config(FederatedConfig, CONFIG, over)
    plan = plan_federation(cfg)
    specs = encoder_specs(cfg, plan)
    m = cfg.modalities["image"]
    arr = modality_arrays(m.task, data_path(cfg, m.path), m.split, "image")
    weights = trainable_weights(build_model(specs["image"], cfg.run.seed))
    local = cfg.local
    torch.set_num_threads(1)
    passes = []
    for _ in range(4):  # the first pass warms up (allocator, kernels, the model cache) and is dropped
        total = 0.0
        for client, rows in sorted(plan["rows"]["image"].items()):
            data = {"image": (specs["image"], m.task, arr.x[rows], arr.y[rows])}
            t0 = time.perf_counter()
            fit_client(client, weights, data, local, seed=cfg.run.seed, round_=1)
            total += time.perf_counter() - t0
        passes.append(total)
    return statistics.median(passes[1:])


def scale_round(shared: Path, clients: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "jobs/federated.py", "--config", str(CONFIG), f"data_root={shared}",
               f"run.storage={tmp}", f"clients.count={clients}", "clients.fraction=0.1", "partition.scheme=iid",
               "rounds=1", "local.batch_size=8", "clients.min_per_round=1", "bootstrap=10", "run.num_cpus=2"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
        (run,) = Path(tmp).glob("federated-*")
        summary = json.loads((run / "rounds.json").read_text())
    (row,) = summary["rounds"]
    return {"clients": clients, "sampled": row["sampled"], "participants": len(row["participants"]),
            "executors": row["executors"], "round_s": round(row["round_s"], 2), "fit_s": round(row["fit_s"], 2),
            "driver_peak_rss_mb": round(summary["driver_peak_rss_mb"], 1),
            "executor_peak_rss_mb": round(row["executor_peak_rss_mb"], 1), "job_wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale-clients", type=int, default=1000)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "federated_round.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    shared = Path(a.shared_data)
    ratios, rounds, computes = [], [], []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            over = overrides(shared, tmp, a.clients, a.rounds, a.local_epochs)
            times = job_round_times(over)
            import ray

            ray.shutdown()  # the next repeat starts its own embedded Ray, as a fresh job would
            compute = pure_compute(over) / 2  # two executors work in parallel
        rounds.append(statistics.median(times))
        computes.append(compute)
        ratios.append(rounds[-1] / compute)
    result = {
        "bench": "federated_round", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "clients_per_round": a.clients, "local_epochs": a.local_epochs, "executors": 2, "repeats": a.repeats,
        "round_s": spread(rounds), "pure_compute_per_executor_s": spread(computes),
        "round_vs_compute_ratio": spread(ratios),
        "scale": scale_round(shared, a.scale_clients) if a.scale_clients else None,
    }
    write_result(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
