"""Pretraining throughput on one GPU: the llama-1b job against a plain PyTorch loop, eager and compiled.

On the same preset, micro-batch and GPU (jobs/configs/pretrain/llama1b_gpu.yaml's shape,
with a shorter run), each measured ``--repeats`` times and reported as the median:
  (a) the plain loop (bench/pretrain_throughput.py's, on CUDA in bf16), eager;
  (b) the same loop with every decoder layer compiled;
  (c) the job (one Ray Train worker + DeepSpeed) with train.compile=false;
  (d) the job with train.compile=true;
  (e) the domain-LoRA job (jobs/configs/finetune/llama1b_domain_gpu.yaml's shape), compiled.
MFU is tokens/s x the job's FLOPs/token (6 per trainable, 4 per frozen parameter, plus
attention) over the card's peak (--peak-flops, H100/H200 bf16 dense by default).
Writes bench/results/pretrain_gpu.json (device, job_mfu, job_vs_compiled_loop, lora_mfu,
and every measurement). Sized to finish within about 5 minutes on one H100.
Without CUDA it prints one line saying it skipped, writes nothing and exits 0.

    python bench/pretrain_gpu.py [--steps 12] [--warmup 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402  (bench/common.py)
from pretrain_throughput import REPO, spread  # noqa: E402  (its CPU twin: the repository, median/min/max)

PRETRAIN = REPO / "jobs/configs/pretrain/llama1b_gpu.yaml"
DOMAIN = REPO / "jobs/configs/finetune/llama1b_domain_gpu.yaml"
PRESET, SEQ_LEN, MICRO_BATCH, VOCAB = "llama-1b", 2048, 8, 32000


def plain_loop(steps: int, warmup: int, *, compiled: bool) -> float:
    """Tokens/s of the minimal loop (random tokens, AdamW, clipping) in bf16 on this GPU."""
    import torch

    from ray_med.models import build_model
    from ray_med.training.speed import compile_layers

    torch.manual_seed(0)
    model = build_model(PRESET, vocab_size=VOCAB).to("cuda", torch.bfloat16)
    if compiled:
        compile_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=True)
    batches = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN), device="cuda") for _ in range(4)]
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        ids = batches[i % len(batches)]
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    rate = steps * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - start)
    del model, opt
    torch.cuda.empty_cache()
    return rate


def job_run(job: str, steps: int, warmup: int, storage: str, shared: Path, name: str, *, compiled: bool,
            tokenizer: str | None) -> dict:
    """One short run of the job; tokens/s between the first logged step after warmup and the last before the end."""
    from ray_med.config import load_config
    from ray_med.registry import execute, get_job

    total = warmup + steps
    config, section = (PRETRAIN, "train") if job == "pretrain" else (DOMAIN, "lm")
    spec = get_job("pretrain" if job == "pretrain" else "finetune")
    cfg = load_config(spec.config, config, [
        f"run.storage={storage}", f"run.name={name}", f"corpus.root={shared}",
        *([f"tokenizer.path={tokenizer}"] if tokenizer else []),
        f"{section}.micro_batch_size={MICRO_BATCH}", f"{section}.grad_accum=1", f"{section}.max_steps={total}",
        f"{section}.log_every=1", f"{section}.report_every={total}", f"{section}.compile={str(compiled).lower()}",
        f"checkpoint.every_steps={total}", f"eval.every_steps={10 * total}", "eval.max_sequences=2",
    ])
    out = execute(spec, cfg)
    rows = {r["step"]: r for r in out.history if "loss" in r}
    logged = sorted(s for s in rows if warmup <= s < total)
    first, last = rows[logged[0]], rows[logged[-1]]
    rate = (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])
    return {"tokens_per_s": rate, "mfu": statistics.median(r["mfu"] for r in rows.values() if r["step"] > warmup),
            "time_to_first_step_s": out.history[-1].get("time_to_first_step_s")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_gpu.json"))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("pretrain_gpu: skipped, no CUDA device (nothing written)")
        return 0
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {k: [] for k in ("loop_eager", "loop_compiled", "job_eager", "job_compiled",
                                                   "lora_compiled")}
    tokenizer = None
    with tempfile.TemporaryDirectory() as storage:
        for i in range(args.repeats):
            runs["loop_eager"].append({"tokens_per_s": plain_loop(args.steps, args.warmup, compiled=False)})
            runs["loop_compiled"].append({"tokens_per_s": plain_loop(args.steps, args.warmup, compiled=True)})
            for key, job, compiled in (("job_eager", "pretrain", False), ("job_compiled", "pretrain", True),
                                       ("lora_compiled", "domain", True)):
                name = f"gpu-{key}-{i}"
                runs[key].append(job_run(job, args.steps, args.warmup, storage, Path(args.shared_data), name,
                                         compiled=compiled, tokenizer=tokenizer))
                # Later runs reuse the first run's tokenizer: the same vocabulary, no retraining.
                tokenizer = tokenizer or str(Path(storage) / name / "tokenizer")
    ray.shutdown()

    def med(key: str, field: str = "tokens_per_s") -> float:
        return statistics.median(r[field] for r in runs[key])

    result = {
        "benchmark": "pretrain_gpu",
        "device": torch.cuda.get_device_name(0),
        "preset": PRESET, "seq_len": SEQ_LEN, "micro_batch_size": MICRO_BATCH,
        "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
        "job_mfu": round(med("job_compiled", "mfu"), 4),
        "job_vs_compiled_loop": round(med("job_compiled") / med("loop_compiled"), 3),
        "lora_mfu": round(med("lora_compiled", "mfu"), 4),
        "job_eager_mfu": round(med("job_eager", "mfu"), 4),
        "tokens_per_s": {k: spread([r["tokens_per_s"] for r in v]) for k, v in runs.items()},
        "time_to_first_step_s": {k: spread([r["time_to_first_step_s"] for r in v])
                                 for k, v in runs.items() if k.startswith(("job", "lora"))},
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
