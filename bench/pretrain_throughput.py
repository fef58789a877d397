"""Pretraining throughput: the job on Ray Train + DeepSpeed against a minimal PyTorch loop.

Measures steady-state tokens/s on the same tiny model and batch for
  (a) a minimal single-process PyTorch loop using all cores (random tokens, AdamW, clipping);
  (b) the pretraining job with 1 Ray Train worker (DeepSpeed ZeRO-2, Ray Data input);
  (c) the job with 2 workers and ZeRO-2;
and reports ratio_1worker = b/a and ratio_2workers = c/a. The job's throughput is wall-clock
between two logged steps after warmup, so data loading, collectives and the periodic Ray
Train report are all inside it. Writes bench/results/pretrain_throughput.json and prints
it as the last line.

    python bench/pretrain_throughput.py [--steps 100] [--warmup 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    num_workers: int, steps: int, warmup: int, storage: str, shared: Path, report_every: int, log_every: int
) -> dict:
    from ray_med.config import load_config
    from ray_med.registry import execute, get_job
    from ray_med.training.config import PretrainConfig

    total = warmup + steps
    cfg = load_config(PretrainConfig, CONFIG, [
        f"run.storage={storage}", f"run.name=bench-{num_workers}w", f"corpus.root={shared}",
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
    first, last = rows[logged[0]], rows[logged[-1]]
    return {
        "tokens_per_s": (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]),
        "steps_measured": logged[-1] - logged[0],
        "final_loss": rows[total]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--report-every", type=int, default=100, help="train.report_every for the job runs")
    parser.add_argument("--log-every", type=int, default=10, help="train.log_every for the job runs")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shared = Path(args.shared_data)

    # The baseline runs before Ray starts and again after the jobs; their mean is the
    # reference, so drift in this machine's speed during the run does not pick a side.
    a_before = minimal_loop(args.steps, args.warmup)
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        b = job(1, args.steps, args.warmup, storage, shared, args.report_every, args.log_every)
        c = job(2, args.steps, args.warmup, storage, shared, args.report_every, args.log_every)
    ray.shutdown()
    a_after = minimal_loop(args.steps, args.warmup)
    a = (a_before + a_after) / 2
    result = {
        "benchmark": "pretrain_throughput",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "device": "cpu",
        "model": "tiny-llama",
        "seq_len": SEQ_LEN,
        "micro_batch_size": MICRO_BATCH,
        "steps_measured": args.steps,
        "report_every": args.report_every,
        "log_every": args.log_every,
        "minimal_loop_tokens_per_s": round(a, 1),
        "minimal_loop_before_after": [round(a_before, 1), round(a_after, 1)],
        "job_1worker_tokens_per_s": round(b["tokens_per_s"], 1),
        "job_2workers_zero2_tokens_per_s": round(c["tokens_per_s"], 1),
        "ratio_1worker": round(b["tokens_per_s"] / a, 3),
        "ratio_2workers": round(c["tokens_per_s"] / a, 3),
        "python": sys.version.split()[0],
    }
    out = REPO / "bench" / "results" / "pretrain_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
