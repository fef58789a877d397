"""ray_med's federation against Flower's Ray simulation: the same model, data, partition, clients and local epochs.

Both run FedAvg over the 5 clients of jobs/configs/federated/tiny_pneumonia_fedavg.yaml
(PneumoniaMNIST's train split cut 7:1:1:1, the private rows split by Dirichlet(0.5) with
ray_med's own plan), every client every round, 1 local epoch of SGD with momentum (lr,
batch size and momentum from that config), from the same initial weights, with the
server scoring dev after every round, on 2 CPUs (one per client actor on each side).

Flower runs in its own environment, because ``flwr[simulation]`` pins Ray 2.55.1:

    python -m venv ../flwr-venv && ../flwr-venv/bin/pip install torch==2.13.0 "flwr[simulation]==1.42.0"
    python bench/federated_vs_flower.py --flower-python ../flwr-venv/bin/python [--rounds 10] [--repeats 3]

A round's time is, on both sides, the time between the server's dev scoring of one round
and the next (dispatch, the clients' training, aggregation and the scoring); round 1 is
left out (actors starting). The final metric is dev macro AUROC of the final weights,
computed here with ray_med's metric for both. ``time_ratio_vs_flower`` is ours over
Flower's per repeat (median, min, max over --repeats, interleaved). Writes
bench/results/federated_vs_flower.json; the last stdout line is that JSON.
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
from pathlib import Path

import numpy as np
from common import spread, write_result  # bench/common.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs/configs/federated/tiny_pneumonia_fedavg.yaml"



def prepare(over: list[str], path: Path) -> tuple[dict, dict]:
    """Write Flower's inputs from ray_med's plan; return the dev arrays and the spec for scoring."""
    from ray_med.config import load_config
    from ray_med.federated.config import FederatedConfig
    from ray_med.federated.data import modality_arrays
    from ray_med.federated.job import data_path, encoder_specs, plan_federation
    from ray_med.federated.models import build_model, trainable_weights

    cfg = load_config(FederatedConfig, CONFIG, over)
    plan = plan_federation(cfg)
    spec = encoder_specs(cfg, plan)["image"]
    m = cfg.modalities["image"]
    arr = modality_arrays(m.task, data_path(cfg, m.path), m.split, "image")
    weights = list(trainable_weights(build_model(spec, cfg.run.seed)).values())
    out: dict[str, np.ndarray] = {}
    for i, (_, rows) in enumerate(sorted(plan["rows"]["image"].items())):
        out[f"c{i}_x"], out[f"c{i}_y"] = arr.x[rows], arr.y[rows]
    dev = plan["splits"]["image"]["dev"]
    out["dev_x"], out["dev_y"] = arr.x[dev], arr.y[dev]
    for j, w in enumerate(weights):
        out[f"w{j}"] = w
    settings = {"clients": len(plan["rows"]["image"]), "rounds": cfg.rounds, "epochs": cfg.local.epochs,
                "batch_size": cfg.local.batch_size, "lr": cfg.local.lr, "momentum": cfg.local.momentum,
                "seed": cfg.run.seed, "dim": spec.dim, "classes": len(spec.tasks[m.task]), "n_weights": len(weights),
                "cpus": 2}
    out["settings"] = np.array(json.dumps(settings))
    np.savez(path, **out)
    return {"x": arr.x[dev], "y": arr.y[dev]}, {"spec": spec, "task": m.task}


def dev_auroc(weights: dict[str, np.ndarray] | list[np.ndarray], dev: dict, model_info: dict) -> float:
    """Dev macro AUROC of weights by name (ours) or in the model's parameter order (Flower's)."""
    from ray_med.evaluation.metrics import classification_metrics
    from ray_med.federated.client import predict
    from ray_med.federated.models import build_model, load_weights, trainable_weights

    spec = model_info["spec"]
    model = build_model(spec, 0)
    if isinstance(weights, list):
        weights = dict(zip(trainable_weights(model), weights, strict=True))
    load_weights(model, weights)
    probs = predict(model, model_info["task"], dev["x"])
    return float(classification_metrics(dev["y"], probs, "binary", n_bootstrap=0)["auroc_macro"])


def ours(over: list[str], storage: str) -> dict:
    from safetensors.numpy import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token"}
    proc = subprocess.run([sys.executable, "jobs/federated.py", "--config", str(CONFIG), *over,
                           f"run.storage={storage}", "run.num_cpus=2", "bootstrap=10"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    (run,) = Path(storage).glob("federated-*")
    rows = json.loads((run / "rounds.json").read_text())["rounds"]
    state = load_file(str(run / "checkpoint" / "global.safetensors"))
    # From one round's start to the next: the round, its dev scoring and its checkpoint (Flower has none).
    starts = [r["started"] for r in rows]
    return {"round_s": [b - a for a, b in zip(starts, starts[1:], strict=False)], "weights": state}


def flower(python: str, data: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO / "bench")  # Flower's workers import the client code by module name
    proc = subprocess.run([python, str(REPO / "bench" / "flower_sim.py"), str(data), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit("Flower run failed:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
    res = json.loads(out.read_text())
    with np.load(str(out).replace(".json", "_weights.npz")) as z:
        res["weights"] = [z[f"arr_{i}"] for i in range(len(z.files))]
    with np.load(data) as z:  # a run whose clients all failed keeps the initial weights: refuse it
        if all(np.array_equal(w, z[f"w{j}"]) for j, w in enumerate(res["weights"])):
            raise SystemExit("Flower run: the weights never changed (its clients failed):\n" + proc.stdout[-3000:])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flower-python", required=True, help="python of an environment with flwr[simulation] and torch")
    p.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "federated_vs_flower.json"))
    a = p.parse_args(argv)
    over = [f"data_root={a.shared_data}", f"rounds={a.rounds}"]
    ratios, our_round, fl_round, our_auc, fl_auc = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "flower_inputs.npz"
        dev, info = prepare(over, data)
        for r in range(a.repeats):
            o = ours(over, f"{tmp}/ours{r}")
            f = flower(a.flower_python, data, Path(tmp) / f"flower{r}.json")
            our_round.append(statistics.median(o["round_s"][1:]))  # intervals from round 2 on
            fl_round.append(statistics.median(f["round_s"][1:]))
            ratios.append(our_round[-1] / fl_round[-1])
            our_auc.append(dev_auroc(o["weights"], dev, info))
            fl_auc.append(dev_auroc(f["weights"], dev, info))
    result = {
        "bench": "federated_vs_flower", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "flower": subprocess.run([a.flower_python, "-c", "import flwr, ray; print(flwr.__version__, ray.__version__)"],
                                 capture_output=True, text=True).stdout.strip(),
        "rounds": a.rounds, "clients": 5, "repeats": a.repeats,
        "ours_round_s": spread(our_round), "flower_round_s": spread(fl_round),
        "ours_dev_auroc": spread(our_auc), "flower_dev_auroc": spread(fl_auc),
        "time_ratio_vs_flower": spread(ratios),
    }
    write_result(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
