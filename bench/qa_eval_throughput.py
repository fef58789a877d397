"""Offline sc_cot: every item's samples in one decode loop against one item at a time, with identical answers.

Self-contained: a tiny Llama (``tiny-llama`` preset, random init) with a BPE tokenizer
trained on PubMedQA text, answering the first ``--items`` (default 100) PubMedQA
questions of ../shared/data in ``sc_cot`` mode (n=5, temperature 0.7, seed 0,
``--new-tokens`` 32), as ``jobs/evaluate.py qa`` does (:func:`ray_med.evaluation.qa.answer_items`):

* **batched**: all items and samples through one BatchDecoder of up to 64 sequences
  (``evaluate.py qa``'s default ``decode_batch``);
* **one at a time**: ``answer_items`` called on one item after another (its 5 samples
  decoded together: the shape of the former per-item ``generate(num_return_sequences=5)``);
* **one sequence at a time** (``decode_batch=1``): every sample of every item alone.

Both use the seeding rule of :func:`ray_med.evaluation.qa.cot_requests`, so the samples,
votes and answers must be identical; the run fails otherwise. Key ``sc_cot_speedup``:
one-at-a-time seconds over batched seconds, the median of ``--repeats`` (default 3),
min and max beside it (``speedup_vs_one_sequence`` against the third). A random-init
model writes no extractable answer, so every item abstains: the benchmark times the
decoding and checks the answers agree, it does not score them. Writes ``bench/results/qa_eval_throughput.json``.

    python bench/qa_eval_throughput.py [--items 100] [--repeats 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import spread, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "qa_eval_throughput.json"))
    args = ap.parse_args(argv)

    import torch

    from ray_med.data import read_records
    from ray_med.evaluation.config import QAConfig
    from ray_med.evaluation.qa import answer_items
    from ray_med.models import build_model, train_bpe_tokenizer
    from ray_med.tasks.prompts import item_from_record

    torch.set_num_threads(os.cpu_count() or 1)
    shared = Path(os.environ.get("RAY_MED_SHARED_DATA", REPO.parent / "shared" / "data"))
    records = read_records("pubmedqa", str(shared / "pubmedqa" / "pqal_trainval.json")).records
    items = [item_from_record(r) for r in records[: args.items]]
    tok = train_bpe_tokenizer([f"{r.context or ''} {r.question or ''}" for r in records], vocab_size=2048)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = build_model("tiny-llama", vocab_size=len(tok)).eval()
    cfg = QAConfig(mode="sc_cot", n=5, temperature=0.7, seed=0, max_new_tokens=args.new_tokens)

    answer_items(model, tok, items[:2], cfg)  # warm up
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        batched = answer_items(model, tok, items, cfg, decode_batch=64)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [answer_items(model, tok, [it], cfg)[0] for it in items]
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        sequential = answer_items(model, tok, items, cfg, decode_batch=1)
        t_sequential = time.perf_counter() - t0
        same = all(a.samples == b.samples == c.samples and a.votes == b.votes == c.votes and a.answer == b.answer
                   for a, b, c in zip(batched, single, sequential, strict=True))
        if not same:
            print("batched and one-at-a-time answers differ", file=sys.stderr)
            return 1
        tokens = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for r in batched for s in r.samples)
        runs.append({"batched_s": t_batched, "one_at_a_time_s": t_single, "speedup": t_single / t_batched,
                     "one_sequence_at_a_time_s": t_sequential, "speedup_vs_one_sequence": t_sequential / t_batched,
                     "approx_tokens": tokens, "identical_answers": same})
        print(runs[-1], flush=True)
    answered = sum(not r.abstained for r in batched)
    result = {
        "benchmark": "qa_eval_throughput", "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "model": "tiny-llama (random init), BPE 2048 on PubMedQA", "items": len(items), "mode": "sc_cot", "n": 5,
        "temperature": 0.7, "max_new_tokens": args.new_tokens, "decode_batch": 64, "repeats": args.repeats,
        "batched_s": spread([r["batched_s"] for r in runs], 2),
        "one_at_a_time_s": spread([r["one_at_a_time_s"] for r in runs], 2),
        "speedup": spread([r["speedup"] for r in runs], 2),
        "one_sequence_at_a_time_s": spread([r["one_sequence_at_a_time_s"] for r in runs], 2),
        "speedup_vs_one_sequence": spread([r["speedup_vs_one_sequence"] for r in runs], 2),
        "identical_answers": all(r["identical_answers"] for r in runs), "answered_items": answered,
        "runs": runs,
    }
    result["sc_cot_speedup"] = result["speedup"]["median"]
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
