"""``jobs/federated.py``: check the config, plan on the cluster, run the rounds, save the global encoders.

Outputs in ``<output_dir>/`` (default: the run folder):

* ``global/<modality>/``: the aggregated encoder with its task heads (``model.safetensors``)
  and how to rebuild it (``config.json``: encoder, size, label names, the round);
  :func:`ray_med.federated.models.load_modality` and ``evaluate.py federated`` read it;
* ``rounds.json``: per round, the participants, the dropped clients and why, the dev
  metrics, ε under DP, and the round's wall time against the clients' summed compute;
* ``plots/``: dev AUROC (and ε) per round, as PNG;
* ``checkpoint/``: the last round's state; rerunning the same command resumes from it.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ray_med.data.config import resolve_path
from ray_med.errors import ConfigError, DataError
from ray_med.federated.config import FederatedConfig, FederatedOutputs
from ray_med.federated.data import check_modality, feature_stats, modality_arrays, plan_modality
from ray_med.federated.models import (
    ENCODERS,
    MAX_TEXT_LENGTH,
    EncoderSpec,
    build_model,
    load_weights,
    save_modality,
    trainable_weights,
)
from ray_med.federated.partition import SCHEMES
from ray_med.federated.privacy import Accountant
from ray_med.federated.strategies import make_strategy
from ray_med.runtime import RunContext, Storage, init_ray, ray_get
from ray_med.tasks import get_task


def client_names(cfg: FederatedConfig) -> dict[str, list[str]]:
    """Each client and the modalities it holds (named sites, or ``count`` virtual clients holding all)."""
    if cfg.clients.sites:
        return {s.name: list(s.modalities) for s in cfg.clients.sites}
    return {f"client_{i:04d}": sorted(cfg.modalities) for i in range(cfg.clients.count)}


def data_path(cfg: FederatedConfig, path: str) -> str:
    if "://" in path or Path(path).is_absolute() or path.startswith("./"):
        return resolve_path(path)
    return resolve_path(str(Path(cfg.data_root) / path))


def check_config(cfg: FederatedConfig) -> None:
    """Everything that can fail before any actor starts: names, modalities, files, counts."""
    make_strategy(cfg.strategy.name, mu=cfg.strategy.mu)
    if cfg.partition.scheme not in SCHEMES:
        raise ConfigError(f"unknown partition {cfg.partition.scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not cfg.modalities:
        raise ConfigError("modalities: give at least one (image, tabular, text, signal)")
    for mod, m in cfg.modalities.items():
        if mod not in ENCODERS:
            raise ConfigError(f"unknown modality {mod!r}; choose from {', '.join(ENCODERS)}")
        if m.encoder not in ENCODERS[mod]:
            raise ConfigError(f"modality {mod}: unknown encoder {m.encoder!r}; choose one of {', '.join(ENCODERS[mod])}")
        get_task(m.task)
        check_modality(mod, m.task)
        if mod == "text" and m.max_length > MAX_TEXT_LENGTH:
            raise ConfigError(f"modality text: max_length {m.max_length} exceeds the encoders' {MAX_TEXT_LENGTH} "
                              "positions")
        path = data_path(cfg, m.path)
        if not Path(path).exists():
            raise DataError(f"modality {mod}: data file not found: {path}")
    holds = client_names(cfg)
    if not holds:
        raise ConfigError("clients: count must be >= 1, or give sites")
    for client, mods in holds.items():
        unknown = [m for m in mods if m not in cfg.modalities]
        if unknown:
            raise ConfigError(f"site {client} holds modality {unknown[0]!r}, which is not configured; "
                              f"modalities: {', '.join(cfg.modalities)}")
    held = {m for mods in holds.values() for m in mods}
    for mod in cfg.modalities:
        if mod not in held:
            raise ConfigError(f"modality {mod}: no client holds it (add it to a site's modalities or remove it)")
    if not 0 < cfg.clients.fraction <= 1:
        raise ConfigError(f"clients.fraction must be in (0, 1], got {cfg.clients.fraction}")
    if cfg.clients.min_per_round > len(holds):
        raise ConfigError(f"clients.min_per_round {cfg.clients.min_per_round} exceeds the {len(holds)} clients")
    if cfg.dp.enabled and (cfg.dp.clip <= 0 or cfg.dp.noise_multiplier < 0):
        raise ConfigError("dp: clip must be > 0 and noise_multiplier >= 0")
    if cfg.rounds < 1:
        raise ConfigError("rounds must be >= 1")


def plan_federation(cfg: FederatedConfig) -> dict[str, Any]:
    """On the cluster: each modality's labels, splits and clients' rows; the tabular standardisation."""
    holds = client_names(cfg)
    out: dict[str, Any] = {"holds": holds, "rows": {}, "splits": {}, "labels": {}, "stats": {}, "in_features": {}}
    for mod, m in cfg.modalities.items():
        clients = sorted(c for c, mods in holds.items() if mod in mods)
        path = data_path(cfg, m.path)
        p = plan_modality(m.task, path, m.split, clients, scheme=cfg.partition.scheme, alpha=cfg.partition.alpha,
                          seed=cfg.run.seed, ratios=tuple(cfg.partition.ratios), on_error=m.on_error)
        out["rows"][mod] = p["clients"]
        out["splits"][mod] = p["splits"]
        out["labels"][mod] = p["labels"]
        if mod in ("tabular", "signal"):
            out["in_features"][mod] = int(modality_arrays(m.task, path, m.split, mod, on_error=m.on_error).x.shape[1])
        if mod == "tabular":
            out["stats"][mod] = feature_stats(m.task, path, m.split, p["splits"]["public"], on_error=m.on_error)
    return out


def encoder_specs(cfg: FederatedConfig, plan: dict[str, Any]) -> dict[str, EncoderSpec]:
    specs = {}
    for mod, m in cfg.modalities.items():
        mean, std = plan["stats"].get(mod, (None, None))
        specs[mod] = EncoderSpec(modality=mod, encoder=m.encoder, dim=m.dim, tasks={m.task: plan["labels"][mod]},
                                 in_features=plan["in_features"].get(mod, 0), image_size=m.image_size, tower=m.tower,
                                 train_encoder=m.train_encoder, max_length=m.max_length, feature_mean=mean,
                                 feature_std=std)
    return specs


def _line(row: dict[str, Any]) -> str:
    dev = " ".join(f"{m} auroc {v['auroc_macro']:.3f}" for m, v in row.get("dev", {}).items())
    loss = " ".join(f"{m} {v:.3f}" for m, v in row.get("train_loss", {}).items())
    eps = f" eps {row['epsilon']:.2f}" if "epsilon" in row else ""
    drops = f" dropped {len(row['dropped'])}" if row.get("dropped") else ""
    if row.get("skipped"):
        return f"[federated] round {row['round']:>3}: skipped ({len(row['participants'])} answered){drops}"
    return (f"[federated] round {row['round']:>3}: {len(row['participants'])}/{row['sampled']} clients{drops} "
            f"| loss {loss} | dev {dev}{eps} | {row['round_s']:.1f}s (client compute {row['client_compute_s']:.1f}s)")


def write_plots(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """Dev AUROC per round (and ε per round under DP) as PNGs."""
    import matplotlib  # lazy: only the end of a run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    folder.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if not r.get("skipped")]
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for mod in sorted({m for r in done for m in r.get("dev", {})}):
        pts = [(r["round"], r["dev"][mod]["auroc_macro"]) for r in done if mod in r.get("dev", {})]
        ax.plot(*zip(*pts, strict=True), marker="o", label=mod)
    ax.set_xlabel("round")
    ax.set_ylabel("dev macro AUROC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "dev_auroc.png", dpi=100)
    plt.close(fig)
    written.append("dev_auroc.png")
    if any("epsilon" in r for r in done):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        pts = [(r["round"], r["epsilon"]) for r in done if "epsilon" in r]
        ax.plot(*zip(*pts, strict=True), marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon")
        fig.tight_layout()
        fig.savefig(folder / "epsilon.png", dpi=100)
        plt.close(fig)
        written.append("epsilon.png")
    return written


def run_federated(cfg: FederatedConfig, ctx: RunContext) -> FederatedOutputs:
    # lazy: Ray loads when the job runs, not when its config is checked (check_config and its tests)
    import ray

    from ray_med.federated.executor import make_pool
    from ray_med.federated.server import Federation, ServerState, load_state, save_state

    check_config(cfg)
    init_ray(cfg.run)
    out_uri = cfg.output_dir or ctx.dir
    storage = Storage.parse(out_uri)
    # Where the server's executors run (pool.resources): the plan reads the server's data too.
    plan = ray_get(ray.remote(plan_federation).options(num_cpus=1, resources=cfg.pool.resources or None).remote(cfg))
    specs = encoder_specs(cfg, plan)
    init: dict[str, np.ndarray] = {}
    for spec in specs.values():
        init.update(trainable_weights(build_model(spec, cfg.run.seed)))
    plan["keys"] = {mod: [(k, tuple(v.shape)) for k, v in sorted(init.items()) if k.startswith(f"{mod}/")]
                    for mod in specs}
    sizes = {mod: {c: len(r) for c, r in rows.items()} for mod, rows in plan["rows"].items()}
    for mod, per in sizes.items():
        print(f"[federated] {mod}: {cfg.modalities[mod].task} on {len(per)} clients, {sum(per.values())} private rows "
              f"({cfg.partition.scheme}{'' if cfg.partition.scheme == 'iid' else f' alpha {cfg.partition.alpha}'}); "
              f"public {len(plan['splits'][mod]['public'])}, dev {len(plan['splits'][mod]['dev'])}, "
              f"test {len(plan['splits'][mod]['test'])}")
    spec_dicts = {m: asdict(s) for m, s in specs.items()}
    sources = {m: {"task": c.task, "path": data_path(cfg, c.path), "split": c.split, "on_error": c.on_error}
               for m, c in cfg.modalities.items()}
    site_resources = {site.name: site.resources for site in cfg.clients.sites if site.resources}

    def spawn(site: str | None = None) -> Any:
        (actor,) = make_pool(cfg, spec_dicts, sources, resources=site_resources[site] if site else cfg.pool.resources,
                             count=1)
        return actor

    s = cfg.strategy
    strategy = make_strategy(s.name, mu=s.mu, server_lr=s.server_lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)
    fed = Federation(cfg=cfg, plan=plan, pool=[], pinned={}, strategy=strategy, storage=storage, spawn=spawn)
    pool = fed.pool  # the same list: Federation.ready replaces an executor in place
    # The executors go with the job, whatever ends it: on a long-lived cluster, actors left
    # behind would hold their CPUs (and a hospital's node) until the driver exits.
    try:
        pool.extend(spawn() for _ in range(cfg.pool.actors))
        fed.pinned.update({site: spawn(site) for site in site_resources})
        state = load_state(storage)
        if state is not None:
            print(f"[federated] resumed after round {state.round} from {storage.join('checkpoint')}")
        else:
            state = ServerState(weights=init)
        n_clients = len(plan["holds"])
        while state.round < cfg.rounds and state.stopped is None:
            r = state.round
            if cfg.dp.enabled and cfg.dp.max_epsilon is not None:
                q = max(cfg.clients.min_per_round, round(cfg.clients.fraction * n_clients)) / n_clients
                eps = Accountant(state.accountant).epsilon_after(cfg.dp.noise_multiplier, min(q, 1.0), cfg.dp.delta)
                if eps > cfg.dp.max_epsilon:
                    state.stopped = f"privacy budget: round {r + 1} would spend eps {eps:.2f} > {cfg.dp.max_epsilon}"
                    print(f"[federated] stopped: {state.stopped}")
                    save_state(storage, state)
                    break
            t0 = time.perf_counter()
            started = time.time()
            row = fed.round(r, state)
            row["started"] = started
            if not row.get("skipped"):
                dev = fed.evaluate(state.weights, {mod: plan["splits"][mod]["dev"] for mod in specs})
                row["dev"] = {mod: _point(dev[mod]) for mod in specs}
            row["round_s"] = time.perf_counter() - t0
            print(_line(row), flush=True)
            state.log.append(row)
            state.round = r + 1
            save_state(storage, state)
            if cfg.hold_after_round == state.round:
                print(f"[federated] holding after round {state.round} (test hook)", flush=True)
                time.sleep(3600)
        # The final global model on the federation's test split (selected nothing), with bootstrap CIs.
        test = fed.evaluate(state.weights, {mod: plan["splits"][mod]["test"] for mod in specs}, cfg.bootstrap)
        for mod, spec in specs.items():
            model = build_model(spec, cfg.run.seed)
            load_weights(model, state.weights)
            with storage.local_dir(f"global/{mod}") as folder:
                # The source and split ratios let the injection stage rebuild the same public/dev/test split.
                save_modality(model, folder, extra={"round": state.round, "strategy": s.name, "seed": cfg.run.seed,
                                                    "source": sources[mod], "ratios": list(cfg.partition.ratios)})
        summary = {"rounds": state.log, "test": test, "stopped": state.stopped, "clients": n_clients,
                   "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "sizes": sizes, "epsilon": state.log[-1].get("epsilon") if state.log else None}
        storage.write_text("rounds.json", json.dumps(summary, indent=2, default=json_default) + "\n")
        with storage.local_dir("plots") as folder:
            write_plots(state.log, folder)
        for mod, m in test.items():
            lo, hi = m["auroc_macro_ci"]
            print(f"{mod} ({cfg.modalities[mod].task}) test: macro AUROC {m['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}], "
                  f"accuracy {m['accuracy']:.4f} on {m['n']}")
        print(f"global model: {storage.join('global')}/<modality>  (rounds: {storage.join('rounds.json')})")
        return FederatedOutputs(run_dir=ctx.dir, global_dir=storage.join("global"), rounds=state.log, test=test)
    finally:
        fed.close()


def _point(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if not k.endswith("_ci")}


def json_default(x: Any) -> Any:
    """``json.dumps``'s ``default`` for numpy values; NaN and infinities as null (the file stays JSON)."""
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating | float):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON: {type(x).__name__}")
