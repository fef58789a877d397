"""The Flower side of bench/federated_vs_flower.py: run in Flower's own environment (flwr[simulation] pins Ray 2.55.1).

    PYTHONPATH=bench <flower-venv>/bin/python bench/flower_sim.py DATA.npz OUT.json

(bench/ on PYTHONPATH: the client code is pickled by reference to this module, which
Flower's Ray workers must import by name, not as ``__main__``.)

DATA.npz is written by bench/federated_vs_flower.py from ray_med's own plan: each client's
preprocessed X-rays and labels (``c<i>_x``, ``c<i>_y``), the dev rows, the initial weights
(``w<j>`` in the model's parameter order) and the settings. The model below is the same
two-block CNN as ``ray_med/federated/models.py``'s ``cnn`` encoder plus its linear head,
written out again because this environment cannot import ray_med (it needs Ray 2.60); the
script checks the parameter shapes against the initial weights before running. Local
training matches ray_med's client: SGD with momentum, fresh every round, one shuffled
pass per local epoch with a last short batch. The server scores dev after every round, as
ray_med's does. Writes the per-round times and the final weights.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

DATA = os.environ.get("FLOWER_SIM_DATA", "")


@functools.lru_cache(maxsize=1)
def data() -> dict:
    with np.load(DATA) as z:
        return {k: z[k] for k in z.files}


class Model(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.proj = nn.Linear(32, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.conv(x).flatten(1)))


def settings() -> dict:
    return json.loads(str(data()["settings"]))


def model() -> Model:
    s = settings()
    return Model(s["dim"], s["classes"])


def set_weights(m: Model, weights: list[np.ndarray]) -> None:
    with torch.no_grad():
        for p, w in zip(m.parameters(), weights, strict=True):
            p.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))


class Client(NumPyClient):
    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, parameters, config):
        torch.set_num_threads(1)
        s, d = settings(), data()
        x, y = torch.from_numpy(d[f"c{self.cid}_x"]), torch.from_numpy(d[f"c{self.cid}_y"].astype(np.int64))
        m = model()
        set_weights(m, parameters)
        opt = torch.optim.SGD(m.parameters(), lr=s["lr"], momentum=s["momentum"])
        loss_fn = nn.CrossEntropyLoss()
        rnd = int(config.get("server_round", 0))
        m.train()
        for epoch in range(s["epochs"]):
            order = np.random.default_rng([s["seed"], rnd, self.cid, epoch]).permutation(len(y))
            for i in range(0, len(order), s["batch_size"]):
                idx = torch.from_numpy(order[i:i + s["batch_size"]])
                loss = loss_fn(m(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return [p.detach().numpy().copy() for p in m.parameters()], len(y), {}


stamps: list[float] = []
final: list[np.ndarray] = []


def evaluate(server_round, parameters, config):
    """Server-side dev scoring after each round (round 0: the initial weights); the times between calls are rounds."""
    stamps.append(time.perf_counter())
    final[:] = [np.asarray(p) for p in parameters]
    d = data()
    m = model()
    set_weights(m, parameters)
    m.eval()
    with torch.no_grad():
        logits = m(torch.from_numpy(d["dev_x"]))
    loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(d["dev_y"].astype(np.int64))))
    return loss, {}


def server_fn(context):
    s, d = settings(), data()
    init = [d[f"w{j}"] for j in range(s["n_weights"])]
    shapes = [tuple(p.shape) for p in model().parameters()]
    assert shapes == [w.shape for w in init], (shapes, [w.shape for w in init])
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=s["clients"],
                      min_available_clients=s["clients"], initial_parameters=ndarrays_to_parameters(init),
                      evaluate_fn=evaluate, on_fit_config_fn=lambda rnd: {"server_round": rnd})
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=s["rounds"]))


def main(out: str) -> None:
    s = settings()
    t0 = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=lambda ctx: Client(int(ctx.node_config["partition-id"])).to_client()),
                   num_supernodes=s["clients"],
                   backend_config={"client_resources": {"num_cpus": 1.0}, "init_args": {"num_cpus": s["cpus"]}})
    wall = time.perf_counter() - t0
    rounds = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    np.savez(out.replace(".json", "_weights.npz"), *final)
    with open(out, "w") as f:
        json.dump({"round_s": rounds, "wall_s": wall}, f)


if __name__ == "__main__":
    os.environ["FLOWER_SIM_DATA"] = sys.argv[1]
    import flower_sim  # this file again, under its importable name (see the docstring)

    flower_sim.DATA = sys.argv[1]
    flower_sim.main(sys.argv[2])
