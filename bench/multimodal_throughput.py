"""Multimodal throughput: the job on Ray Train (1 worker) against a minimal PyTorch loop.

Measures steady-state samples/s on the same tiny model (tiny-vlm, phase full) and batch for
  (a) the multimodal job (jobs/configs/multimodal/tiny_pneumonia.yaml, real PneumoniaMNIST
      + PubMedQA from --shared-data) with 1 Ray Train worker, no held-out scoring;
  (b) a minimal single-process loop in this process: the same examples (the job's train
      split, encoded with the job's own tokenizer), the same batches (the first batches of
      the job's epoch-0 mixture plan, collated through the same Pixels and collate before
      timing), the same initial weights (the job's seed), AdamW with the job's lr, weight
      decay, schedule and clipping, and as many torch threads as the job's worker;
``--repeats`` times, interleaved (a, b, a, b, ...), and reports each one's median with
min and max, and the ratio a/b of each repeat against that repeat's loop (median, min, max).

The job's throughput comes from its history: ``samples_per_s`` of the rows logged every
``--log-every`` steps (training time only: the loop pauses its window for evaluation,
reports and checkpoints), the first ``--warmup`` steps' rows skipped, the rest combined
as their total samples over their total time. The loop times the same steps after the
same warm-up. Both run in the first epoch, so no epoch-end evaluation falls inside.
The job runs with ``train.eval_every`` = its step count: a single dev evaluation and
checkpoint after the last logged row (out of the window), since a run that never
evaluates has no best_dev to print at the end. Each job run gets a fresh run name and
output_dir (never resumes). The per-step cost of collate with a cold Pixels cache (what
the job pays on its first epoch, the loop before timing) is measured too.

The machine may be shared: each run records the 1-minute load average before and after
it, the loop the CPU cores it got, and both their windows of ``--log-every`` steps;
``ratio_1worker_median_window`` (each run's median window) is the same comparison made
less sensitive to a burst of other work hitting one window. The job's Ray workers run
at nice 15 (Ray's default), so such bursts slow the job more than the loop.

Writes bench/results/multimodal_throughput.json (or --out) and prints it as the last line.

    python bench/multimodal_throughput.py [--steps 70] [--warmup 10] [--repeats 3] [--log-every 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs/configs/multimodal/tiny_pneumonia.yaml"


def overrides(shared: Path, storage: str, name: str, out_dir: str, total: int, log_every: int) -> list[str]:
    """The job's config overrides (the loop loads the config with the same ones)."""
    return [
        f"data_root={shared}", "eval=[]", "scaling.num_workers=1",
        # A fresh run name and output folder each time: the same name would resume the finished run.
        f"run.storage={storage}", f"run.name={name}", f"output_dir={out_dir}",
        f"train.max_steps={total}", f"train.log_every={log_every}", f"train.eval_every={total}",
    ]


def load(args_over: list[str]) -> Any:
    from ray_med.config import load_config
    from ray_med.training.multimodal_config import MultimodalConfig

    return load_config(MultimodalConfig, CONFIG, args_over)


def job(cfg: Any, steps: int, warmup: int) -> dict:
    from ray_med.registry import execute, get_job

    total = warmup + steps
    history = execute(get_job("multimodal"), cfg).history
    rows = sorted((r for r in history if "samples_per_s" in r and warmup < r["step"] <= total),
                  key=lambda r: r["step"])
    if not rows:
        raise SystemExit(f"no logged row after step {warmup}: lower --log-every")
    # Each row's window holds the samples of the steps since the previous row.
    prev = [warmup, *(r["step"] for r in rows[:-1])]
    samples = [(r["step"] - p) * cfg.train.batch_size for r, p in zip(rows, prev, strict=True)]
    seconds = sum(n / r["samples_per_s"] for n, r in zip(samples, rows, strict=True))
    last = rows[-1]
    return {
        "samples_per_s": sum(samples) / seconds,
        "steps_measured": last["step"] - warmup,
        "windows_samples_per_s": [round(r["samples_per_s"], 2) for r in rows],
        "final_loss": last["loss"],
    }


def data(cfg: Any, tokenizer_dir: str, scratch: str) -> dict:
    """The job's encoded train split, its plan's batches, and what the model needs: as its worker builds them."""
    import torch

    from ray_med.data.task_mixture import MixtureSettings, plan_epoch, shard
    from ray_med.evaluation.multimodal import ModelGeometry, prepare
    from ray_med.models.vlm import build_vlm
    from ray_med.runtime import seed_everything
    from ray_med.training.multimodal import _tokenizer, prepare_data

    seed = cfg.run.seed
    # The job's own data step, in this process: the same items, the same dev held out. It also
    # trains a tokenizer (into scratch), unused: the loop encodes with the job's.
    train = prepare_data(cfg, scratch)[1]["train"]
    tokenizer = _tokenizer(tokenizer_dir)
    seed_everything(seed)  # as the worker: the same initial weights
    base = build_vlm(cfg.model, tokenizer)
    geo = ModelGeometry.of(base.config)
    encoded = {t: [prepare(tokenizer, ex, geo, cfg.train.max_length) for ex in items] for t, items in train.items()}
    ratios = {s.task: s.ratio for s in cfg.tasks if s.ratio is not None} or None
    upsample = {s.task: s.upsample for s in cfg.tasks if s.upsample != 1.0} or None
    mixture = MixtureSettings(ratios=ratios, min_per_task_per_batch=cfg.mixture.min_per_task_per_batch,
                              upsample=upsample)
    sizes = {t: len(v) for t, v in encoded.items()}
    n_batches = max(1, sum(sizes.values()) // cfg.train.batch_size)
    t0 = time.perf_counter()
    plan = shard(plan_epoch(sizes, mixture, batch_size=cfg.train.batch_size, n_batches=n_batches, seed=seed,
                            epoch=0), 0, 1)
    plan_s = time.perf_counter() - t0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"base": base, "geo": geo, "plan": plan, "plan_s": plan_s, "pad": pad,
            "batches": [[encoded[t][j] for t, j in pairs] for pairs in plan], "dtype": torch.float32}


def minimal_loop(cfg: Any, d: dict, steps: int, warmup: int, log_every: int, threads: int) -> dict:
    import torch

    from ray_med.evaluation.multimodal import Pixels, collate
    from ray_med.models.vlm import set_phase

    torch.set_num_threads(threads)
    model = set_phase(d["base"], cfg.model.phase, cfg.model.lora)
    model.train()
    dtype = next(model.parameters()).dtype
    total = warmup + steps
    # Collated before timing, through a fresh Pixels (cold cache, as the job's first epoch): the
    # per-step cost of that is recorded, not timed.
    pixels = Pixels(d["geo"].spec)
    t0 = time.perf_counter()
    batches = [collate(b, pixels, d["pad"], dtype=dtype) for b in d["batches"][:total]]
    collate_ms = (time.perf_counter() - t0) / total * 1e3
    inputs = [{k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values") if b[k] is not None}
              for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    n_sched = t.max_steps
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / t.warmup_steps if s < t.warmup_steps
        else max(0.0, (n_sched - s) / max(1, n_sched - t.warmup_steps)),
    )
    clip = t.grad_clip if t.grad_clip > 0 else math.inf
    marks = []  # (wall, CPU of this process) every log_every steps from the end of warm-up, as the job's rows
    for i, kwargs in enumerate(inputs):
        if i == warmup:
            marks.append((time.perf_counter(), time.process_time()))
        loss = model(**kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup and (i + 1 - warmup) % log_every == 0:
            marks.append((time.perf_counter(), time.process_time()))
    elapsed = marks[-1][0] - marks[0][0]
    windows = [log_every * t.batch_size / (b[0] - a[0]) for a, b in zip(marks[:-1], marks[1:], strict=True)]
    return {"samples_per_s": steps * t.batch_size / elapsed, "final_loss": float(loss.detach()),
            "windows_samples_per_s": [round(w, 2) for w in windows],
            "cpu_cores_used": round((marks[-1][1] - marks[0][1]) / elapsed, 2),
            "collate_cold_ms_per_step": round(collate_ms, 2)}


def spread(values: list[float], digits: int = 1) -> dict:
    """Median, min and max."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=70, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the measured ones")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of (job, loop)")
    parser.add_argument("--log-every", type=int, default=10, help="train.log_every for the job runs")
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "multimodal_throughput.json"))
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (the result is a median with its min and max)")
    if args.warmup < args.log_every or args.warmup % args.log_every or args.steps % args.log_every:
        parser.error("--warmup and --steps must be multiples of --log-every, and --warmup at least one of them")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shared = Path(args.shared_data).resolve()
    total = args.warmup + args.steps

    import ray
    import torch

    from ray_med.runtime import init_ray
    from ray_med.training.trainer import threads_per_worker

    runs: dict[str, list[dict]] = {"job_1worker": [], "minimal_loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        storage = str(Path(tmp) / "runs")
        # Ray starts as the job would start it and stays up (idle while the loop runs), so every
        # repeat sees the same machine; the repeats interleave, so drift hits both alike.
        init_ray(load(overrides(shared, storage, "x", tmp, total, args.log_every)).run)
        threads = None
        for i in range(args.repeats):
            out_dir = str(Path(tmp) / f"out-{i}")
            cfg = load(overrides(shared, storage, f"bench-mm-{i}", out_dir, total, args.log_every))
            threads = threads_per_worker(cfg.scaling)  # what the job's worker uses
            # The 1-minute load average around each run: other work on the machine shows up here
            # (the job's worker alone keeps it near its thread count).
            load_before = round(os.getloadavg()[0], 2)
            runs["job_1worker"].append({**job(cfg, args.steps, args.warmup), "loadavg_1m_before": load_before,
                                        "loadavg_1m_after": round(os.getloadavg()[0], 2)})
            # The loop on this repeat's job's tokenizer (trained by the job, in its output_dir).
            d = data(cfg, str(Path(out_dir) / "tokenizer"), str(Path(tmp) / f"scratch-{i}"))
            if total > len(d["plan"]):
                raise SystemExit(f"--warmup + --steps = {total} is more than one epoch ({len(d['plan'])} steps)")
            load_before = round(os.getloadavg()[0], 2)
            runs["minimal_loop"].append({**minimal_loop(cfg, d, args.steps, args.warmup, args.log_every, threads),
                                         "plan_epoch_ms": round(d["plan_s"] * 1e3, 2),
                                         "loadavg_1m_before": load_before,
                                         "loadavg_1m_after": round(os.getloadavg()[0], 2)})
            del d
    ray.shutdown()
    job_sps = [r["samples_per_s"] for r in runs["job_1worker"]]
    loop_sps = [r["samples_per_s"] for r in runs["minimal_loop"]]
    ratios = [a / b for a, b in zip(job_sps, loop_sps, strict=True)]
    # The same ratio from each run's median window of log_every steps: a burst of other work on the
    # machine that hits one window moves it less (the headline stays the whole-window ratio above).
    window_ratios = [statistics.median(j["windows_samples_per_s"]) / statistics.median(m["windows_samples_per_s"])
                     for j, m in zip(runs["job_1worker"], runs["minimal_loop"], strict=True)]

    result = {
        "benchmark": "multimodal_throughput",
        "machine": {"platform": platform.platform(), "arch": platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "ray": ray.__version__, "python": sys.version.split()[0]},
        "device": "cpu",
        "command": shlex.join(["python", "bench/multimodal_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": str(CONFIG.relative_to(REPO)),
        "model": "tiny-vlm (phase full)",
        "batch_size": cfg.train.batch_size,
        "torch_threads": threads,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "log_every": args.log_every,
        "steps_measured": {"minimal_loop": args.steps,
                           "job_1worker": sorted({r["steps_measured"] for r in runs["job_1worker"]})},
        "job_1worker_samples_per_s": spread(job_sps, 2),
        "minimal_loop_samples_per_s": spread(loop_sps, 2),
        "ratio_1worker": spread(ratios, 3),
        "ratio_1worker_median_window": spread(window_ratios, 3),
        "per_repeat": [
            {"job_1worker": {**j, "samples_per_s": round(j["samples_per_s"], 2)},
             "minimal_loop": {**m, "samples_per_s": round(m["samples_per_s"], 2)},
             "ratio": round(r, 3), "ratio_median_window": round(w, 3)}
            for j, m, r, w in zip(runs["job_1worker"], runs["minimal_loop"], ratios, window_ratios, strict=True)
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
