"""The federation's rounds on Ray: sample, dispatch with a deadline, drop and re-admit, aggregate, checkpoint.

One round:

1. sample ``fraction`` of the clients (at least ``min_per_round``) with the round's RNG,
   ``default_rng([seed, round])``: the sampler's state is a function of the saved round;
2. (secure aggregation) collect the sampled clients' public keys;
3. dispatch: each executor runs one client at a time, the next as soon as it is free;
   ``ray.wait`` stops at the deadline. A client whose executor died, whose data failed,
   or that was still running at the deadline is dropped from the round (and recorded);
   it is sampled again in later rounds like any other. A pinned site whose executor does
   not answer at the round's start (its node is gone) is dropped from the round without
   waiting for it, and re-admitted at the first round it answers again (Ray restarts
   its actor when a node with the site's resources comes back);
4. if fewer than ``min_per_round`` results came back the round is redone (new sample,
   once), then skipped with the global weights unchanged;
5. aggregate (:mod:`~ray_med.federated.strategies`; the sum unmasked after removing the
   dropped clients' masks, :mod:`~ray_med.federated.secagg`; noised and accounted under
   DP, :mod:`~ray_med.federated.privacy`), take the server step, score dev;
6. checkpoint: global weights, the strategy's state, the round, the accountant, every
   client's record and the round log, written atomically. A rerun of the same command
   (same run folder) resumes at the next round and ends with the same weights.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from safetensors.numpy import load_file, save_file

from ray_med.federated import secagg
from ray_med.federated.config import FederatedConfig
from ray_med.federated.executor import unpack
from ray_med.federated.privacy import Accountant, add_noise, dp_average, noise_std
from ray_med.federated.strategies import Strategy, Weights, aggregate, sum_contributions
from ray_med.runtime import Storage, localize, ray_get


@dataclass
class ServerState:
    """Everything a resumed federation needs (the round checkpoint)."""

    round: int = 0
    """Rounds completed."""
    weights: Weights = field(default_factory=dict)
    strategy: dict[str, Weights] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    accountant: list[list[float]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None


def _flat(state: dict[str, Weights]) -> dict[str, np.ndarray]:
    return {f"{name}::{k}": np.ascontiguousarray(v) for name, part in state.items() for k, v in part.items()}


def _unflat(flat: dict[str, np.ndarray]) -> dict[str, Weights]:
    out: dict[str, Weights] = {}
    for key, value in flat.items():
        name, _, k = key.partition("::")
        out.setdefault(name, {})[k] = value
    return out


def save_state(storage: Storage, state: ServerState) -> None:
    """The checkpoint folder, replaced atomically (a crash mid-write leaves the previous round's)."""
    with storage.local_dir("checkpoint") as folder:
        save_file({k: np.ascontiguousarray(v) for k, v in state.weights.items()}, str(folder / "global.safetensors"))
        if state.strategy:
            save_file(_flat(state.strategy), str(folder / "strategy.safetensors"))
        meta = {"round": state.round, "records": state.records, "accountant": state.accountant, "log": state.log,
                "stopped": state.stopped}
        (folder / "state.json").write_text(json.dumps(meta, default=float) + "\n")


def load_state(storage: Storage) -> ServerState | None:
    """The last round checkpoint, or None for a fresh federation."""
    if not storage.complete("checkpoint"):
        return None
    folder = Path(localize(storage.join("checkpoint"), what="federated checkpoint"))
    meta = json.loads((folder / "state.json").read_text())
    strategy = _unflat(load_file(str(folder / "strategy.safetensors"))) if (folder / "strategy.safetensors").exists() else {}
    return ServerState(round=meta["round"], weights=dict(load_file(str(folder / "global.safetensors"))),
                       strategy=strategy, records=meta["records"], accountant=meta["accountant"], log=meta["log"],
                       stopped=meta.get("stopped"))


def _kill(actor: Any) -> None:
    """``ray.kill`` without restart, best effort: an actor already gone (or Ray itself) has nothing left to stop."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001
        pass


def sample_clients(clients: list[str], fraction: float, minimum: int, rng: np.random.Generator) -> list[str]:
    k = min(len(clients), max(minimum, int(round(fraction * len(clients)))))
    return sorted(rng.choice(clients, size=k, replace=False).tolist())


@dataclass
class Federation:
    """What the rounds need from the job: the config, the plan, the executors and the strategy."""

    cfg: FederatedConfig
    plan: dict[str, Any]
    """holds: client -> modalities; rows: modality -> client -> rows; splits; keys: modality -> [(key, shape)]."""
    pool: list[Any]
    pinned: dict[str, Any]
    """Client -> its own executor (a site pinned by custom resources)."""
    strategy: Strategy
    storage: Storage
    spawn: Any = None
    """spawn(site or None) -> a new executor (for the shared pool, or pinned to a site's resources)."""
    log: Any = print
    down: set[str] = field(default_factory=set)
    """Pinned sites whose executor did not answer at this round's start (left out of it)."""
    started: bool = False
    """Whether the executors have had their first start (waited for ``pool.start_wait_s``)."""

    def close(self) -> None:
        """Stop every executor (the job is over); best effort, so the job's own error is the one raised."""
        for actor in [*self.pool, *self.pinned.values()]:
            _kill(actor)

    def _replace(self, old: Any, site: str | None) -> Any:
        # The old handle is killed first: a "dead" actor that Ray was still restarting would
        # otherwise come back and hold the site's one hospital_X resource forever.
        _kill(old)
        return self.spawn(site)

    def _probe(self, actors: dict[Any, Any], wait_s: float) -> dict[Any, str]:
        """Each actor's state after at most ``wait_s``, all asked at once: 'up', 'dead' (out of
        restarts) or 'down' (no answer: restarting, or waiting for a node to start on)."""
        deadline = time.monotonic() + wait_s
        pending = {actor.pid.remote(): key for key, actor in actors.items()}
        states: dict[Any, str] = {}
        while pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                key = pending.pop(ref)
                try:
                    ray.get(ref)
                    states[key] = "up"
                except ray.exceptions.ActorDiedError:
                    states[key] = "dead"
                except ray.exceptions.ActorUnavailableError:  # Ray is restarting it: ask again shortly
                    time.sleep(0.5)
                    pending[actors[key].pid.remote()] = key
        states.update({key: "down" for key in pending.values()})
        return states

    def ready(self) -> None:
        """Every executor answering, at a round's start.

        The executors' first start (a cold node: boot, image pull) is waited for
        ``pool.start_wait_s``. The shared pool runs anywhere, so a pool executor that does
        not answer in that time fails the job; one out of restarts is replaced. Pinned
        sites are asked all at once; after the first start, a site is waited for only
        ``pool.site_wait_s`` (a site whose node is gone cannot come back by waiting, and
        one missing hospital must not hold up the others): it is left out of the round
        (``down``) and asked again at the next.
        """
        cfg = self.cfg.pool
        self._ready_pool()
        wait = cfg.site_wait_s if self.started else cfg.start_wait_s
        sites = self._probe(dict(self.pinned), wait)
        for site in [s for s, state in sites.items() if state == "dead"]:
            self.log(f"[federated] site {site}'s executor is out of restarts; starting a new one")
            self.pinned[site] = self._replace(self.pinned[site], site)
        sites.update(self._probe({s: self.pinned[s] for s, state in sites.items() if state == "dead"}, wait))
        self.started = True
        for site, state in sorted(sites.items()):
            if state == "up" and site in self.down:
                self.log(f"[federated] site {site} answers again; re-admitted")
                self.down.discard(site)
            elif state != "up" and site not in self.down:
                self.log(f"[federated] site {site} does not answer (its node may be gone); left out until it does")
                self.down.add(site)

    def _ready_pool(self) -> None:
        """Every shared-pool executor answering (waited for up to ``pool.start_wait_s``); one out of restarts replaced."""
        cfg = self.cfg.pool
        for _ in range(2):  # once more for the executors just replaced
            pool = self._probe(dict(enumerate(self.pool)), cfg.start_wait_s)
            if any(state == "down" for state in pool.values()):
                raise ray.exceptions.GetTimeoutError(
                    f"a federated pool executor did not start in {cfg.start_wait_s:.0f}s (pool.start_wait_s); "
                    f"does a node offer num_cpus {cfg.num_cpus} and the resources {cfg.resources or '{}'}?")
            dead = [i for i, state in pool.items() if state == "dead"]
            for i in dead:
                self.log("[federated] an executor is out of restarts; starting a new one")
                self.pool[i] = self._replace(self.pool[i], None)
            if not dead:
                break

    def evaluate(self, weights: Weights, rows: dict[str, Any], *args: Any, attempts: int = 3) -> dict[str, Any]:
        """Each modality's ``rows`` scored by a pool executor, all at once (``args``: the executor's, e.g. bootstrap).

        An executor that a client's crash took down may still be restarting when the
        round's scoring reaches it (Ray answers ``ActorUnavailableError``), or be out of
        restarts: the pool is waited for (and a dead executor replaced), and the
        modalities it did not score are asked again, at most ``attempts`` times.
        """
        out: dict[str, Any] = {}
        todo = list(rows)
        for attempt in range(attempts):
            refs = {mod: self.pool[i % len(self.pool)].evaluate.remote(weights, mod, rows[mod], *args)
                    for i, mod in enumerate(todo)}
            failed = []
            for mod, ref in refs.items():
                try:
                    out[mod] = ray_get(ref)
                except ray.exceptions.RayActorError:  # restarting (ActorUnavailableError) or dead
                    failed.append(mod)
            if not failed:
                return out
            if attempt + 1 < attempts:
                self.log(f"[federated] an executor was restarting while scoring {', '.join(failed)}; asking again")
                self._ready_pool()
            todo = failed
        raise ray.exceptions.RayActorError(f"no pool executor could score {', '.join(todo)} in {attempts} attempts")

    def _dispatch(self, round_: int, sampled: list[str], state: ServerState, global_ref: Any,
                  plan_ref: Any, job: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Run the sampled clients on the executors until done or the deadline; (results, dropped with reasons)."""
        shared = deque(c for c in sampled if c not in self.pinned)
        pinned = deque(c for c in sampled if c in self.pinned and c not in self.down)
        free = list(self.pool)
        busy_pinned: set[str] = set()
        inflight: dict[Any, tuple[str, Any]] = {}
        results: dict[str, dict[str, Any]] = {}
        dropped: dict[str, str] = {c: "site unavailable" for c in sampled if c in self.down}
        deadline = time.monotonic() + self.cfg.pool.deadline_s

        def submit(actor: Any, client: str) -> None:
            ref = actor.fit.remote(client, state.records.get(client, {}), round_, plan_ref, global_ref, job)
            inflight[ref] = (client, actor)

        while shared or pinned or inflight:
            while free and shared:
                submit(free.pop(), shared.popleft())
            for _ in range(len(pinned)):
                c = pinned.popleft()
                if c in busy_pinned:
                    pinned.append(c)
                else:
                    busy_pinned.add(c)
                    submit(self.pinned[c], c)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for ref in ready:
                client, actor = inflight.pop(ref)
                if client in self.pinned:
                    busy_pinned.discard(client)
                try:
                    res = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    # Its executor died: Ray restarts it; it rejoins the pool at the next round's start.
                    dropped[client] = f"executor failed: {type(exc).__name__}"
                    continue
                if client not in self.pinned:
                    free.append(actor)
                if "error" in res:
                    dropped[client] = res["error"]
                    state.records[client] = res["record"]
                    continue
                results[client] = res
                state.records[client] = res["record"]
        for ref, (client, _) in inflight.items():
            try:  # best effort: a running task of a sync actor cannot be interrupted, only left to finish
                ray.cancel(ref)
            except Exception:  # noqa: BLE001  (whatever cancel says, the client is out of this round)
                pass
            dropped[client] = f"deadline ({self.cfg.pool.deadline_s:.0f}s)"
        for client in [*shared, *pinned]:
            dropped[client] = f"deadline ({self.cfg.pool.deadline_s:.0f}s), not started"
        return results, dropped

    def _secure_sum(self, round_: int, results: dict[str, dict[str, Any]], peers: dict[str, dict[str, bytes]]
                    ) -> tuple[Weights, dict[str, float]]:
        """The unmasked sums per modality: masked vectors summed, dropped peers' masks removed, decoded."""
        total: Weights = {}
        scale: dict[str, float] = {}
        for mod, keys in self.plan["keys"].items():
            senders = sorted(c for c, r in results.items() if mod in r["masked"])
            if not senders:
                continue
            masked = secagg.masked_sum([results[c]["masked"][mod] for c in senders])
            dropped = {c: pub for c, pub in peers[mod].items() if c not in results}
            if dropped:
                refs = [self.pool[i % len(self.pool)].reveal.remote(s, round_, mod, dropped)
                        for i, s in enumerate(senders)]
                revealed = [t for part in ray.get(refs) for t in part]
                masked = secagg.remove_dropped(masked, revealed)
            delta, s = unpack(secagg.decode(masked), keys)
            total.update(delta)
            scale[mod] = s
        return total, scale

    def round(self, round_: int, state: ServerState) -> dict[str, Any] | None:
        """Run round ``round_`` (0-based) and update ``state``; the round's log row."""
        cfg = self.cfg
        clients = sorted(self.plan["holds"])
        t0 = time.perf_counter()
        row: dict[str, Any] = {"round": round_ + 1}
        self.ready()
        for attempt in range(2):
            rng = np.random.default_rng([cfg.run.seed, round_, attempt])
            sampled = sample_clients(clients, cfg.clients.fraction, cfg.clients.min_per_round, rng)
            job: dict[str, Any] = {"local": asdict(cfg.local), "mu": self.strategy.mu, "fail_client": cfg.fail_client,
                                   "crash_client": cfg.crash_client,
                                   "dp_clip": cfg.dp.clip if cfg.dp.enabled else None}
            peers: dict[str, dict[str, bytes]] = {}
            if cfg.secagg.enabled:
                keys = ray.get(self.pool[0].public_keys.remote(sampled, round_))
                peers = {mod: {c: keys[c] for c in sampled if mod in self.plan["holds"][c]} for mod in self.plan["keys"]}
                job.update(peers=peers, keys=self.plan["keys"])
            global_ref = ray.put(state.weights)
            plan_ref = ray.put({"holds": self.plan["holds"], "rows": self.plan["rows"]})
            results, dropped = self._dispatch(round_, sampled, state, global_ref, plan_ref, job)
            row.update(sampled=len(sampled), participants=sorted(results), dropped=dropped)
            if len(results) >= cfg.clients.min_per_round:
                break
            self.log(f"[federated] round {round_ + 1}: {len(results)} of {len(sampled)} clients answered "
                     f"(min {cfg.clients.min_per_round}); " + ("redoing it" if attempt == 0 else "skipping it"))
        else:
            row.update(skipped=True, round_s=time.perf_counter() - t0)
            return row
        ordered = [results[c] for c in sorted(results)]
        if cfg.secagg.enabled:
            total, scale = self._secure_sum(round_, results, peers)
        else:
            total, scale = sum_contributions(r["contribution"] for r in ordered)
        if cfg.dp.enabled:
            q = len(sampled) / len(clients)
            noisy = add_noise(total, noise_multiplier=cfg.dp.noise_multiplier, clip=cfg.dp.clip,
                              rng=np.random.default_rng([cfg.run.seed, round_, 99]))
            expected = {mod: q * sum(1 for c in clients if mod in self.plan["holds"][c]) for mod in scale}
            update = dp_average(noisy, expected)
            acc = Accountant(state.accountant)
            acc.step(cfg.dp.noise_multiplier, q)
            state.accountant = acc.history
            row["epsilon"] = acc.epsilon(cfg.dp.delta)
            row["noise_std"] = {m: noise_std(cfg.dp.noise_multiplier, cfg.dp.clip, e) for m, e in expected.items()}
        else:
            update = aggregate(total, scale)
        self.strategy.state = state.strategy
        state.weights = self.strategy.apply(state.weights, update)
        state.strategy = self.strategy.state
        row["fit_s"] = time.perf_counter() - t0  # sample, dispatch, aggregate and step: the round without scoring
        row["executors"] = len({r["pid"] for r in ordered})
        row["executor_peak_rss_mb"] = max(r["peak_rss_mb"] for r in ordered)
        row["client_compute_s"] = sum(r["metrics"].get("compute_s", 0.0) for r in ordered)
        row["train_loss"] = {m: float(np.mean([r["metrics"][m]["loss"] for r in ordered if m in r["metrics"]]))
                             for m in self.plan["keys"] if any(m in r["metrics"] for r in ordered)}
        return row

