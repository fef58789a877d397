"""The thin actor shell: a pool executor that runs any virtual client, as Flower's simulation engine does.

An executor holds no client state between calls. Each call gets the client's name, its
record (what it carried from earlier rounds), the plan (which rows of each modality are
the client's) and the global weights, and returns the client's contribution and its new
record. Data is read inside the executor, once per process (:mod:`ray_med.federated.data`),
so features never pass through the driver.

With secure aggregation the executor also plays the client's key agreement: it derives
the client's round key, gives its public half, masks the client's packed update with the
seeds it shares with its peers, and reveals a seed with a peer that dropped.

A client's own failure (malformed data, a bad row) is returned as an error result: the
federation records it and goes on. An executor that dies (a killed actor, a lost node)
is restarted by Ray (``max_restarts``); the client it was running is dropped from that
round and sampled again later.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
import traceback
from typing import Any

import numpy as np
import ray

from ray_med.errors import DataError
from ray_med.evaluation.metrics import classification_metrics
from ray_med.federated import secagg
from ray_med.federated.client import cached_model, fit_client, predict
from ray_med.federated.config import LocalConfig
from ray_med.federated.data import modality_arrays
from ray_med.federated.models import EncoderSpec, load_weights
from ray_med.federated.strategies import Contribution, modality_of
from ray_med.tasks import get_task

FAIL_MARKER = "RAY_MED_FEDERATED_FAIL_CLIENT"


def client_secret(seed: int, client: str) -> bytes:
    """The simulation's stand-in for a hospital's own secret (a deployment keeps a real one at the hospital)."""
    return hashlib.sha256(f"ray_med client secret {seed} {client}".encode()).digest()


def pack(contribution: Contribution, modality: str, keys: list[tuple[str, tuple[int, ...]]]) -> np.ndarray:
    """One modality's update and weight as one float vector (keys in the plan's order, then the weight)."""
    parts = [np.asarray(contribution.delta[k], np.float64).ravel() for k, _ in keys]
    return np.concatenate([*parts, [contribution.scale[modality]]])


def unpack(vector: np.ndarray, keys: list[tuple[str, tuple[int, ...]]]) -> tuple[dict[str, np.ndarray], float]:
    out, at = {}, 0
    for key, shape in keys:
        size = int(np.prod(shape))
        out[key] = vector[at:at + size].reshape(shape)
        at += size
    return out, float(vector[at])


class ClientExecutor:
    """Runs clients' rounds and scores global models; stateless apart from its per-process data cache."""

    def __init__(self, specs: dict[str, dict[str, Any]], sources: dict[str, dict[str, Any]], seed: int) -> None:
        self.specs = {m: EncoderSpec(**s) for m, s in specs.items()}
        self.sources = sources
        self.seed = seed
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def _arrays(self, modality: str):
        src = self.sources[modality]
        spec = self.specs[modality]
        return modality_arrays(src["task"], src["path"], src["split"], modality, spec.image_size, spec.max_length,
                               src["on_error"])

    def pid(self) -> int:
        return os.getpid()

    def fit(self, client: str, record: dict[str, Any], round_: int, plan: dict[str, Any], global_w: dict,
            job: dict[str, Any]) -> dict[str, Any]:
        """One round of one client; an error in its own data is returned, not raised."""
        if job.get("crash_client") == f"{client}@{round_ + 1}":
            os._exit(1)  # test hook: the process dies as a killed actor does (no cleanup, no exception)
        try:
            if job.get("fail_client") == client:
                raise DataError(f"client {client}: malformed rows in its data (test hook fail_client)")
            data = {}
            for mod in plan["holds"][client]:
                arr = self._arrays(mod)
                rows = plan["rows"][mod][client]
                data[mod] = (self.specs[mod], self.sources[mod]["task"], arr.x[rows], arr.y[rows])
            t0 = time.perf_counter()
            contribution, metrics = fit_client(client, global_w, data, LocalConfig(**job["local"]), seed=self.seed,
                                               round_=round_, mu=job["mu"], dp_clip=job.get("dp_clip"))
            metrics["compute_s"] = time.perf_counter() - t0
        except Exception as exc:  # the client's failure is the federation's record, not its end
            return {"client": client, "error": f"{type(exc).__name__}: {exc}",
                    "trace": traceback.format_exc(limit=3), "record": {**record, "failures": record.get("failures", 0) + 1}}
        new_record = {**record, "rounds": record.get("rounds", 0) + 1, "last_round": round_,
                                "last_loss": {m: v["loss"] for m, v in metrics.items() if isinstance(v, dict)}}
        out: dict[str, Any] = {"client": client, "metrics": metrics, "record": new_record, "pid": os.getpid(),
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if job.get("peers") is None:
            out["contribution"] = contribution
            return out
        # Secure aggregation: per modality, the packed update masked with this round's peers holding it.
        key = secagg.round_key(client_secret(self.seed, client), round_)
        out["masked"] = {}
        for mod in plan["holds"][client]:
            peers = {p: pub for p, pub in job["peers"][mod].items() if p != client}
            seeds = {p: secagg.pair_seed(key, pub, f"{round_}/{mod}".encode()) for p, pub in peers.items()}
            out["masked"][mod] = secagg.mask(secagg.encode(pack(contribution, mod, job["keys"][mod])), client, seeds)
        return out

    def public_keys(self, clients: list[str], round_: int) -> dict[str, bytes]:
        """Each client's public key for the round (the advertise-keys step)."""
        return {c: secagg.public_bytes(secagg.round_key(client_secret(self.seed, c), round_)) for c in clients}

    def reveal(self, survivor: str, round_: int, modality: str, dropped: dict[str, bytes]) -> list[tuple[str, str, int]]:
        """The seeds ``survivor`` shares with peers that dropped (the recovery step)."""
        key = secagg.round_key(client_secret(self.seed, survivor), round_)
        return [(survivor, d, secagg.pair_seed(key, pub, f"{round_}/{modality}".encode())) for d, pub in dropped.items()]

    def evaluate(self, global_w: dict, modality: str, rows: np.ndarray, bootstrap: int = 0) -> dict[str, Any]:
        """The global model's metrics on ``rows`` of the modality's file (dev each round, test at the end)."""
        spec = self.specs[modality]
        task = self.sources[modality]["task"]
        model = cached_model(spec, self.seed)  # the fits' model: evaluation re-reads no pretrained encoder
        load_weights(model, {k: v for k, v in global_w.items() if modality_of(k) == modality})
        arr = self._arrays(modality)
        probs = predict(model, task, arr.x[rows])
        m = classification_metrics(arr.y[rows], probs, get_task(task).task_type, n_bootstrap=bootstrap,
                                   seed=self.seed)
        return {k: v for k, v in m.items() if not k.startswith("auroc_labels")}


def make_pool(cfg: Any, specs: dict[str, dict[str, Any]], sources: dict[str, dict[str, Any]],
              resources: dict[str, float] | None = None, count: int | None = None) -> list[Any]:
    """``pool.actors`` executors (each one CPU, restarted up to ``pool.max_restarts`` times)."""
    remote = ray.remote(ClientExecutor).options(num_cpus=cfg.pool.num_cpus, max_restarts=cfg.pool.max_restarts,
                                                max_task_retries=0, resources=resources or None)
    return [remote.remote(specs, sources, cfg.run.seed) for _ in range(count or cfg.pool.actors)]
