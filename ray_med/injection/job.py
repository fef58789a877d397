"""``jobs/inject.py``: the federated encoders injected into an LLM (FedKIM's server), on Ray Train.

The driver checks the config, then one Ray task reads each task's data as the federated
run saved it (``global/<modality>/config.json``: file, seed, split ratios), rebuilds the
7:1:1:1 split and keeps the public rows (training), dev rows (selection) and test rows
(reporting) as encoder inputs in the object store; for a preset LLM it also trains the
BPE tokenizer on the seen tasks' prompts (never on the unseen tasks' texts).

Each worker builds the LLM, the frozen encoders, a projector per modality and the
method's adapter (M3OE, FedPlugL's LoRA sized to M3OE's trainable-parameter budget, or
nothing for FedPlug), and trains with :func:`ray_med.injection.train.train_injection`.
Rank 0 scores the test rows of every seen and unseen task once (macro AUROC with a
bootstrap CI, accuracy), records the gate per task, and writes:

* ``model/``: the injected model (:mod:`ray_med.injection.model` documents the folder);
* ``adapter/``: the M3OE folder or FedPlugL's PEFT LoRA (none for FedPlug);
* ``folded/<task>/``: M3OE only: each task's gate folded into a plain PEFT LoRA;
* ``metrics.json``, ``gate_stats.json``, ``predictions_<task>.jsonl``.

With ``rounds_interleaved`` the driver alternates: one federated round (the federated
job, resumed under ``<output_dir>/federated``), then one injection epoch that starts
from the previous epoch's projectors and adapter.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import peft
import ray
import ray.train.torch
import torch
from peft import set_peft_model_state_dict
from ray.train.torch import prepare_model
from safetensors.torch import load_file

from ray_med.adapters.m3oe import M3OE, GateStats, M3OEConfig
from ray_med.config import load_config
from ray_med.errors import ConfigError, DataError
from ray_med.federated.config import FederatedConfig
from ray_med.federated.data import modality_arrays
from ray_med.federated.job import json_default, run_federated
from ray_med.federated.models import load_modality
from ray_med.federated.partition import fedkim_split
from ray_med.injection.config import InjectConfig, InjectOutputs
from ray_med.injection.model import (
    PLACEHOLDERS,
    Encoder,
    InjectedModel,
    TaskSpec,
    add_placeholders,
    choice_probs,
    fold_task,
    load_projectors,
    prompt_text,
    save_injected,
)
from ray_med.injection.train import task_auroc, train_injection
from ray_med.models import build_model, count_parameters, load_tokenizer, train_bpe_tokenizer
from ray_med.models.loading import load_causal_lm, save_pretrained
from ray_med.runtime import RunContext, Storage, init_ray, is_uri, localize, ray_get, seed_everything
from ray_med.training.trainer import build_trainer, fit, threads_per_worker
from ray_med.training.worker import RayCheckpoints, reduce_mean, say, worker_info

TOKENIZER_DIR = "tokenizer"


def modality_folder(global_dir: str, modality: str) -> Path:
    """A federated run's ``global/<modality>`` on this machine (remote storage commits each modality folder)."""
    if is_uri(global_dir):
        return Path(localize(f"{global_dir.rstrip('/')}/{modality}", what=f"federated {modality} encoder",
                             error=ConfigError))
    return Path(global_dir) / modality


def _modality_config(global_dir: str, modality: str) -> dict[str, Any]:
    path = modality_folder(global_dir, modality) / "config.json"
    if not path.is_file():
        root = Path(global_dir)
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ConfigError(f"{global_dir} has no federated {modality} encoder (it holds: {', '.join(have) or 'nothing'})")
    raw = json.loads(path.read_text())
    if "source" not in raw:
        raise ConfigError(f"{path} does not say which data the federation used (written by an older ray_med); "
                          "rerun the federated job")
    return raw


def task_specs(cfg: InjectConfig, global_dir: str) -> dict[str, TaskSpec]:
    """Every task with its data's label names (checked against its answers)."""
    specs = {}
    for t, seen in [*((t, True) for t in cfg.tasks), *((t, False) for t in cfg.unseen)]:
        raw = _modality_config(global_dir, t.modality)
        labels = next(iter(raw["tasks"].values()))
        spec = TaskSpec(t.name, t.modality, t.description, t.question, dict(t.answers), list(labels), seen)
        spec.check_labels()
        specs[t.name] = spec
    return specs


def _sample(rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    if len(rows) <= k:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, k, replace=False))


def prepare_data(cfg: InjectConfig, global_dir: str, out_uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, data): runs as one Ray task; the arrays stay in the object store."""
    specs = task_specs(cfg, global_dir)
    raws = {m: _modality_config(global_dir, m) for m in {s.modality for s in specs.values()}}
    data: dict[str, Any] = {"train": {}, "dev": {}, "test": {}}
    for name, spec in specs.items():
        raw = raws[spec.modality]
        src = raw["source"]
        arr = modality_arrays(src["task"], src["path"], src["split"], spec.modality,
                              image_size=int(raw.get("image_size", 28)), max_length=int(raw.get("max_length", 128)),
                              on_error=src.get("on_error", "raise"))
        splits = fedkim_split(arr.y, int(raw["seed"]), tuple(raw["ratios"]))
        parts = {"test": splits["test"]}
        if spec.seen:
            parts["train"] = splits["public"]
            parts["dev"] = _sample(splits["dev"], cfg.train.dev_max_items, cfg.run.seed)
        for split, rows in parts.items():
            data[split][name] = {"x": arr.x[rows], "y": arr.y[rows], "rows": rows}
    tokenizer_dir = None
    if not cfg.llm.path:
        # A preset has no tokenizer: train one on what the model reads in training (never the unseen texts).
        texts = [f"{prompt_text(s, 1)} {o}" for s in specs.values() if s.seen for o in s.options]
        texts += list(cfg.modality_texts.values())
        out = Storage.parse(out_uri)
        with out.local_dir(TOKENIZER_DIR) as folder:
            tok = train_bpe_tokenizer(texts * 4, vocab_size=cfg.tokenizer.vocab_size,
                                      min_frequency=cfg.tokenizer.min_frequency)
            tok.save_pretrained(str(folder))
        tokenizer_dir = out.join(TOKENIZER_DIR)
    summary = {split: {t: int(len(v["y"])) for t, v in part.items()} for split, part in data.items()}
    summary["tokenizer_dir"] = tokenizer_dir
    summary["tasks"] = {n: asdict(s) for n, s in specs.items()}
    return summary, data


@dataclass
class WorkerSpec:
    cfg: InjectConfig
    data: Any
    """[ObjectRef] of prepare_data's data."""
    tasks: dict[str, dict[str, Any]]
    tokenizer_dir: str
    global_dir: str
    out_dir: str
    threads: int
    init_from: str | None = None
    """Interleaved rounds: the output folder whose projectors and adapter this epoch starts from."""


def _target_width(llm: Any, target_modules: list[str]) -> int:
    """Sum of in + out features of the LLM's linear layers named in ``target_modules`` (a rank-1 LoRA's size)."""
    width = sum(m.in_features + m.out_features for n, m in llm.named_modules()
                if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in target_modules)
    if width == 0:
        raise ConfigError(f"adapter.target_modules {target_modules} match no linear layer of the LLM")
    return width


def lora_rank_for_budget(llm: Any, target_modules: list[str], budget: int) -> int:
    """The plain LoRA rank whose parameters on ``target_modules`` come closest to ``budget`` (at least 1)."""
    return max(1, round(budget / _target_width(llm, target_modules)))


def inject_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train ``train_loop_per_worker``; rank 0 returns the test metrics."""
    spec: WorkerSpec = config["spec"]
    cfg = spec.cfg
    torch.set_num_threads(spec.threads)
    seed_everything(cfg.run.seed)
    info = worker_info()
    rank, world = info.rank, info.world
    data = ray.get(spec.data[0])
    tasks = {n: TaskSpec(**t) for n, t in spec.tasks.items()}
    modalities = sorted({t.modality for t in tasks.values()})
    tokenizer = load_tokenizer(localize(spec.tokenizer_dir))
    token_ids = add_placeholders(tokenizer, modalities)
    if cfg.llm.path:
        llm = load_causal_lm(localize(cfg.llm.path))
    else:
        assert cfg.llm.preset is not None
        llm = build_model(cfg.llm.preset, vocab_size=len(tokenizer))
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))  # the placeholders' rows (never looked up: replaced)
    llm.requires_grad_(False)
    device = ray.train.torch.get_device()
    scratch = Path(tempfile.mkdtemp(prefix="inject-"))
    if rank == 0:  # the frozen base as it is before any adapter: model/llm
        save_pretrained(llm, scratch / "llm", tokenizer)
    folders = {m: modality_folder(spec.global_dir, m) for m in modalities}
    encoders = {m: load_modality(folders[m]) for m in modalities}
    model = InjectedModel(llm, encoders, token_ids, cfg.tokens_per_modality, cfg.modality_texts)
    m3oe_cfg = M3OEConfig.from_adapter_config(cfg.adapter)
    budget = _m3oe_budget(llm, m3oe_cfg)
    lora_r = None
    if cfg.method == "m3oe":
        model.attach_m3oe(M3OE.inject(llm, m3oe_cfg))
    elif cfg.method == "fedplugl":
        lora_r = lora_rank_for_budget(llm, list(cfg.adapter.target_modules), budget)
        scale = cfg.adapter.alpha / cfg.adapter.r  # the same alpha / r as M3OE's experts
        model.llm = peft.get_peft_model(llm, peft.LoraConfig(
            r=lora_r, lora_alpha=scale * lora_r, lora_dropout=cfg.adapter.dropout,
            target_modules=list(cfg.adapter.target_modules), bias="none"))
    if spec.init_from:
        prev = Storage.parse(spec.init_from)
        if rank == 0:
            say(f"[inject] starting from the previous epoch's projectors and adapter ({spec.init_from})")
        load_projectors(model, Path(localize(prev.join("model"))) / "projectors.safetensors")
        if cfg.method != "fedplug":
            _load_adapter_weights(model, Path(localize(prev.join("adapter"), what="adapter folder")), cfg.method)
    model.to(device)
    trainable = count_parameters(model, trainable_only=True)
    adapter_params = trainable - sum(p.numel() for p in model.projectors.parameters())
    enc = Encoder(tokenizer, tasks, cfg.modality_texts, cfg.tokens_per_modality)

    def items(split: str) -> dict[str, list[Any]]:
        return {name: [enc.item(name, part["x"][i], int(part["y"][i]), str(int(part["rows"][i])))
                       for i in range(len(part["y"]))] for name, part in data[split].items()}

    train, dev, test = items("train"), items("dev"), items("test")
    if rank == 0:
        say(f"[inject] {cfg.method}: trainable {trainable:,} (adapter {adapter_params:,}, M3OE budget {budget:,}"
            + (f", LoRA rank {lora_r}" if lora_r else "") + f") of {count_parameters(model):,}; "
            f"train {({t: len(v) for t, v in train.items()})}")

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        return prepare_model(m, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})

    t0 = time.perf_counter()
    result = train_injection(
        model, train, dev, cfg.train, pad=enc.pad, load_balance=cfg.adapter.load_balance if model.m3oe else 0.0,
        top_k=cfg.adapter.top_k, seed=cfg.run.seed, shard_of=(rank, world), wrap=wrap if world > 1 else None,
        checkpoints=RayCheckpoints(rank), reduce_mean=reduce_mean(world), log=say if rank == 0 else lambda _: None,
    )
    train_s = time.perf_counter() - t0
    if rank != 0:
        return None
    out = Storage.parse(spec.out_dir)
    stats = GateStats() if model.m3oe is not None else None
    test_metrics: dict[str, Any] = {}
    for name, its in test.items():
        probs = choice_probs(model, its, enc.pad, batch_size=64, stats=stats)
        m = task_auroc(probs, its, n_bootstrap=cfg.bootstrap, seed=cfg.run.seed)
        m["seen"] = tasks[name].seen
        test_metrics[name] = m
        opts = tasks[name].options
        out.write_text(f"predictions_{name}.jsonl", "".join(
            json.dumps({"id": it.id, "gold": opts[it.gold], "prediction": opts[int(row.argmax())],
                        "probabilities": {o: round(float(v), 6) for o, v in zip(opts, row, strict=True)}}) + "\n"
            for it, row in zip(its, probs, strict=True)))
    gate = stats.summary() if stats is not None else {}
    with out.local_dir("model") as folder:
        save_injected(model, folder, llm_dir=scratch / "llm", encoder_dirs={m: str(f) for m, f in folders.items()},
                      tasks=tasks, method=cfg.method)
    adapter_dir = None
    if model.m3oe is not None:
        with out.local_dir("adapter") as folder:
            model.m3oe.save(folder)
        for name, t in tasks.items():
            with out.local_dir(f"folded/{name}") as folder:
                fold_task(model, tokenizer, t, folder)
        adapter_dir = out.join("adapter")
    elif cfg.method == "fedplugl":
        with out.local_dir("adapter") as folder:
            model.llm.save_pretrained(str(folder))
        adapter_dir = out.join("adapter")
    metrics = {k: v for k, v in result.items() if k != "history"}
    metrics.update(method=cfg.method, gate_inputs=cfg.adapter.gate_inputs if cfg.method == "m3oe" else None,
                   trainable=trainable, adapter_params=adapter_params, m3oe_budget=budget, lora_rank=lora_r,
                   train_s=train_s, workers=world, test=test_metrics, adapter_dir=adapter_dir,
                   seen=[n for n, t in tasks.items() if t.seen], unseen=[n for n, t in tasks.items() if not t.seen],
                   n_train={t: len(v) for t, v in train.items()})
    out.write_text("gate_stats.json", json.dumps(gate, indent=2) + "\n")
    metrics["gate"] = gate
    out.write_text("metrics.json", json.dumps({**metrics, "history": result["history"]}, indent=2,
                                              default=json_default) + "\n")
    return metrics


def _m3oe_budget(llm: Any, m3oe_cfg: Any) -> int:
    """M3OE's trainable parameters on this LLM (experts + router), computed without building it."""
    width = _target_width(llm, list(m3oe_cfg.target_modules))
    hidden = llm.get_input_embeddings().embedding_dim
    gate_dim = m3oe_cfg.gate_dim or hidden
    return m3oe_cfg.experts * m3oe_cfg.r * width + 3 * hidden * gate_dim + gate_dim * m3oe_cfg.experts


def _load_adapter_weights(model: Any, folder: Path, method: str) -> None:
    """Continue from a previous epoch's adapter (interleaved rounds)."""
    if method == "m3oe":
        model.m3oe.load_weights(folder)
    elif method == "fedplugl":
        set_peft_model_state_dict(model.llm, load_file(str(folder / "adapter_model.safetensors")))


def check_config(cfg: InjectConfig) -> None:
    """What can fail before any worker starts: the federated folder, the tasks' labels, the LLM folder."""
    if not cfg.rounds_interleaved and not cfg.federated.global_dir:
        raise ConfigError("set federated.global_dir (a federated run's <output_dir>/global), or rounds_interleaved "
                          "with federated.config")
    for t in [*cfg.tasks, *cfg.unseen]:
        if t.modality not in PLACEHOLDERS:
            raise ConfigError(f"task {t.name}: modality {t.modality!r} has no placeholder token")
    if cfg.llm.path and "://" not in cfg.llm.path and not (Path(cfg.llm.path) / "config.json").is_file():
        raise ConfigError(f"llm.path {cfg.llm.path}: not a model folder (no config.json)")
    if cfg.method == "m3oe":
        M3OEConfig.from_adapter_config(cfg.adapter)
    if cfg.federated.global_dir and not cfg.rounds_interleaved:
        gd = cfg.federated.global_dir
        if "://" not in gd:
            if not Path(gd).is_dir():
                raise DataError(f"federated.global_dir {gd}: not found (a federated run's <output_dir>/global)")
            task_specs(cfg, gd)


def _print_results(metrics: dict[str, Any]) -> None:
    print(f"\ninject ({metrics['method']}) finished after {metrics['steps']} steps in {metrics['train_s']:.0f}s: "
          f"best dev AUROC {_num(metrics['best_dev'])} (step {metrics['best_step']})")
    for name, m in metrics["test"].items():
        lo, hi = m["auroc_macro_ci"]
        kind = "seen" if m["seen"] else "unseen"
        print(f"{name} ({kind}) test: macro AUROC {_num(m['auroc_macro'])} [{_num(lo)}, {_num(hi)}], "
              f"accuracy {m['accuracy']:.4f} on {m['n']}")
    for name, g in metrics.get("gate", {}).items():
        usage = " ".join(f"{u:.2f}" for u in g["usage"])
        print(f"gate {name}: entropy {g['entropy']:.3f}, expert usage [{usage}]")


def compare_table(runs: dict[str, dict[str, Any]]) -> str:
    """Every method's test macro AUROC per task, seen and unseen, as a markdown table."""
    methods = list(runs)
    first = runs[methods[0]]["test"]
    lines = ["", "| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for task, m in first.items():
        kind = "seen" if m["seen"] else "unseen"
        lines.append(f"| {task} ({kind}) | " + " | ".join(_num(runs[k]["test"][task]["auroc_macro"]) for k in methods)
                     + " |")
    for kind, flag in (("seen", True), ("unseen", False)):
        means = []
        for k in methods:
            vals = [v["auroc_macro"] for v in runs[k]["test"].values() if v["seen"] == flag
                    and v["auroc_macro"] is not None and np.isfinite(v["auroc_macro"])]
            means.append(_num(float(np.mean(vals))) if vals else "n/a")
        if any(m != "n/a" for m in means):
            lines.append(f"| mean of {kind} | " + " | ".join(means) + " |")
    lines.append("\ntest macro AUROC; trainable adapter parameters: " + ", ".join(
        f"{k} {runs[k]['adapter_params']:,}" for k in methods))
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.4f}"


def _fit_injection(cfg: InjectConfig, ctx: RunContext, out: Storage, global_dir: str, *, name: str | None = None,
                   init_from: str | None = None) -> dict[str, Any]:
    summary_ref, data_ref = ray.remote(prepare_data).options(num_returns=2, num_cpus=1).remote(cfg, global_dir,
                                                                                                out.uri)
    summary = ray_get(summary_ref)
    train_n = sum(summary["train"].values())
    if train_n // cfg.train.batch_size < max(1, cfg.scaling.num_workers):
        raise DataError(f"{train_n} public items make fewer than one batch of {cfg.train.batch_size} per worker; "
                        "lower train.batch_size or scaling.num_workers")
    print(f"[inject] data: public {summary['train']} dev {summary['dev']} test {summary['test']}")
    threads = threads_per_worker(cfg.scaling)
    tokenizer_dir = summary["tokenizer_dir"] or cfg.llm.path
    spec = WorkerSpec(cfg=cfg, data=[data_ref], tasks=summary["tasks"], tokenizer_dir=tokenizer_dir,
                      global_dir=global_dir, out_dir=out.uri, threads=threads, init_from=init_from)
    trainer = build_trainer(inject_worker, {"spec": spec}, scaling=cfg.scaling, ctx=ctx, threads=threads,
                            keep_checkpoints=cfg.checkpoint.keep, name=name)
    return fit(trainer).return_value


def run_inject(cfg: InjectConfig, ctx: RunContext) -> InjectOutputs:
    """Inject after federated training, or interleaved with its rounds; print seen and unseen test results."""
    check_config(cfg)
    init_ray(cfg.run)
    out_dir = cfg.output_dir or ctx.dir
    out = Storage.parse(out_dir)
    if not cfg.rounds_interleaved:
        assert cfg.federated.global_dir is not None
        metrics = _fit_injection(cfg, ctx, out, cfg.federated.global_dir)
    else:
        metrics = _interleaved(cfg, ctx, out)
    _print_results(metrics)
    if cfg.baselines:
        assert cfg.federated.global_dir is not None
        runs = {cfg.method: metrics}
        for method in cfg.baselines:
            # The same data, LLM and adapter budget; only the method changes.
            bcfg = replace(cfg, method=method, baselines=[], output_dir=out.join("baselines", method))
            runs[method] = _fit_injection(bcfg, ctx, Storage.parse(bcfg.output_dir), cfg.federated.global_dir,
                                          name=f"{ctx.name}-{method}")
        metrics["compare"] = {m: {t: v["auroc_macro"] for t, v in r["test"].items()} for m, r in runs.items()}
        print(compare_table(runs))
    print(f"model:   {out_dir}/model" + (f"\nadapter: {metrics['adapter_dir']}" if metrics["adapter_dir"] else ""))
    print(f"metrics: {out_dir}/metrics.json")
    return InjectOutputs(run_dir=ctx.dir, model_dir=f"{out_dir}/model", adapter_dir=metrics["adapter_dir"],
                         metrics=metrics)


def _interleaved(cfg: InjectConfig, ctx: RunContext, out: Storage) -> dict[str, Any]:
    """FedKIM's loop: federated round r, then one injection epoch from epoch r-1's projectors and adapter."""
    assert cfg.federated.config is not None
    fed = load_config(FederatedConfig, cfg.federated.config, cfg.federated.overrides)
    fed_dir = out.join("federated")
    epoch_cfg = replace(cfg, train=replace(cfg.train, epochs=1, max_steps=None), rounds_interleaved=False)
    metrics: dict[str, Any] = {}
    for r in range(1, fed.rounds + 1):
        run_federated(replace(fed, rounds=r, output_dir=fed_dir, run=replace(fed.run, ray_address=cfg.run.ray_address)),
                      ctx)
        metrics = _fit_injection(epoch_cfg, ctx, out, f"{fed_dir}/global", name=f"{ctx.name}-round{r}",
                                 init_from=out.uri if r > 1 else None)
        print(f"[inject] round {r}/{fed.rounds}: injection epoch done, dev AUROC {_num(metrics['best_dev'])}")
    metrics["rounds"] = fed.rounds
    saved = json.loads(out.read_text("metrics.json"))
    out.write_text("metrics.json", json.dumps({**saved, "rounds": fed.rounds, "federated_dir": fed_dir}, indent=2) + "\n")
    return metrics

