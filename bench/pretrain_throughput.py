"""Pretraining throughput: the job on Ray Train + DeepSpeed against a minimal PyTorch loop.

Measures steady-state tokens/s on the same tiny model and batch for
  (a) a minimal single-process PyTorch loop using all cores (random tokens, AdamW, clipping);
  (b) the pretraining job with 1 Ray Train worker (ZeRO-2 asked for; one worker runs stage 0);
  (c) the job with 2 workers and ZeRO-2;
``--repeats`` times, interleaved (a, b, c, a, b, c, ...), and reports for each the median
with min and max, and the ratios b/a and c/a of each repeat against that repeat's
baseline (median, min, max). The job's throughput is wall-clock between the first
logged step after warmup and the last logged step before the final one, so data
loading, collectives and the periodic Ray Train report are all inside it; the steps
really measured, and the ZeRO stage each job really used (from its history), are in the
result. Writes bench/results/pretrain_throughput.json (or --out) and prints it as the
last line.

    python bench/pretrain_throughput.py [--steps 100] [--warmup 15] [--repeats 3]
    python bench/pretrain_throughput.py --steps 20 --warmup 5 --log-every 5 --out bench/results/pretrain_throughput_small.json
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
CONFIG = REPO / "jobs/configs/pretrain/tiny.yaml"
SEQ_LEN, MICRO_BATCH, VOCAB = 256, 16, 2048


def minimal_loop(steps: int, warmup: int) -> float:
    import torch

    from ray_med.models import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model("tiny-llama", vocab_size=VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN)) for _ in range(8)]
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        ids = batches[i % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - start)


def job(
    num_workers: int, steps: int, warmup: int, storage: str, shared: Path, report_every: int, log_every: int,
    name: str, tokenizer: str | None,
) -> dict:
    from ray_med.config import load_config
    from ray_med.registry import execute, get_job
    from ray_med.training.config import PretrainConfig

    total = warmup + steps
    cfg = load_config(PretrainConfig, CONFIG, [
        # A fresh run name each time: the same name would resume the finished run.
        f"run.storage={storage}", f"run.name={name}", f"corpus.root={shared}",
        *([f"tokenizer.path={tokenizer}"] if tokenizer else []),
        f"scaling.num_workers={num_workers}", "deepspeed.zero_stage=2",
        f"train.seq_len={SEQ_LEN}", f"train.micro_batch_size={MICRO_BATCH}", f"tokenizer.vocab_size={VOCAB}",
        f"train.max_steps={total}", f"train.log_every={log_every}", f"train.report_every={report_every}",
        f"checkpoint.every_steps={total}", f"eval.every_steps={10 * total}", "eval.max_sequences=4",
    ])
    history = execute(get_job("pretrain"), cfg).history
    rows = {r["step"]: r for r in history if "loss" in r}
    # From the first logged step after warmup to the last one before the final step,
    # which also checkpoints and exports.
    logged = sorted(s for s in rows if warmup <= s < total)
    if len(logged) < 2:
        raise SystemExit(f"fewer than 2 logged steps in [{warmup}, {total}): raise --steps or lower --log-every")
    first, last = rows[logged[0]], rows[logged[-1]]
    return {
        "tokens_per_s": (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]),
        "steps_measured": logged[-1] - logged[0],
        "zero_stage": rows[total].get("zero_stage"),
        "workers": rows[total].get("world"),
        "final_loss": rows[total]["loss"],
    }


def spread(values: list[float], digits: int = 1) -> dict:
    """Median, min and max."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of (baseline, 1 worker, 2 workers)")
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--report-every", type=int, default=100, help="train.report_every for the job runs")
    parser.add_argument("--log-every", type=int, default=10, help="train.log_every for the job runs")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_throughput.json"))
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (the result is a median with its min and max)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shared = Path(args.shared_data)

    import ray

    # Ray stays up for the whole run (idle while the baseline runs), so every repeat sees
    # the same machine; the repeats interleave, so drift in its speed hits all three alike.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {"minimal_loop": [], "job_1worker": [], "job_2workers_zero2": []}
    tokenizer = None
    with tempfile.TemporaryDirectory() as storage:
        for i in range(args.repeats):
            runs["minimal_loop"].append({"tokens_per_s": minimal_loop(args.steps, args.warmup)})
            for key, workers in (("job_1worker", 1), ("job_2workers_zero2", 2)):
                name = f"bench-{workers}w-{i}"
                runs[key].append(job(workers, args.steps, args.warmup, storage, shared, args.report_every,
                                     args.log_every, name, tokenizer))
                # Later runs reuse the first run's tokenizer: the same vocabulary, no retraining.
                tokenizer = tokenizer or str(Path(storage) / name / "tokenizer")
    ray.shutdown()
    base = [r["tokens_per_s"] for r in runs["minimal_loop"]]

    def ratios(key: str) -> list[float]:
        return [r["tokens_per_s"] / a for r, a in zip(runs[key], base, strict=True)]

    def facts(key: str, field: str) -> list:
        return sorted({r[field] for r in runs[key]})

    result = {
        "benchmark": "pretrain_throughput",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "device": "cpu",
        "model": "tiny-llama",
        "seq_len": SEQ_LEN,
        "micro_batch_size": MICRO_BATCH,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "steps_measured": {"minimal_loop": args.steps, "job_1worker": facts("job_1worker", "steps_measured"),
                           "job_2workers_zero2": facts("job_2workers_zero2", "steps_measured")},
        "zero_stage_used": {"job_1worker": facts("job_1worker", "zero_stage"),
                            "job_2workers_zero2": facts("job_2workers_zero2", "zero_stage")},
        "report_every": args.report_every,
        "log_every": args.log_every,
        "minimal_loop_tokens_per_s": spread(base),
        "job_1worker_tokens_per_s": spread([r["tokens_per_s"] for r in runs["job_1worker"]]),
        "job_2workers_zero2_tokens_per_s": spread([r["tokens_per_s"] for r in runs["job_2workers_zero2"]]),
        "ratio_1worker": spread(ratios("job_1worker"), 3),
        "ratio_2workers": spread(ratios("job_2workers_zero2"), 3),
        "per_repeat": {k: [round(r["tokens_per_s"], 1) for r in v] for k, v in runs.items()},
        "python": sys.version.split()[0],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
