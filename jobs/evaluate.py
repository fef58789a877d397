"""Offline evaluation of models the pipeline produced; the metrics are one JSON object on the last stdout line.

    python jobs/evaluate.py perplexity --model runs/pretrain-xxxx/model \\
        --data ../shared/data/pubmedqa/pqal_trainval.json --format pubmedqa
    python jobs/evaluate.py perplexity --model DIR --data runs/pretrain-xxxx/heldout/abstracts.jsonl --format jsonl

    python jobs/evaluate.py classify --model runs/finetune-xxxx/adapter --task pubmedqa_rf \\
        --data ../shared/data/pubmedqa/pqal_trainval.json --format pubmedqa

    python jobs/evaluate.py qa --model DIR [--adapter LORA_DIR] \\
        --data ../shared/data/pubmedqa/pqal_trainval.json --format pubmedqa --mode sc_cot

Tasks: ``perplexity`` (any causal-LM folder, any corpus file and reader format),
``classify`` (a classifier folder written by ``jobs/finetune.py``: base + adapters + head)
and ``qa`` (a causal LM, optionally with a LoRA adapter, on MedQA/MedMCQA/PubMedQA in
top_token, cot or sc_cot mode; the same code as the Serve app's /v1/qa).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ray_med.errors import RayMedError


def _options(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RayMedError(f"--option {pair!r} is not key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="command", required=True)
    ppl = tasks.add_parser("perplexity", help="perplexity of a causal LM on a corpus file")
    ppl.add_argument("--model", required=True, help="HF model folder (with its tokenizer)")
    ppl.add_argument("--data", required=True, help="corpus file")
    ppl.add_argument("--format", required=True, help="reader: pubmedqa, mtsamples, jsonl, text, parquet, ...")
    ppl.add_argument("--seq-len", type=int, default=256)
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-sequences", type=int, default=None)
    ppl.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="reader option")
    cls = tasks.add_parser("classify", help="macro AUROC (with CI), AUPRC, F1, accuracy of a classifier")
    cls.add_argument("--model", required=True, help="classifier folder (<output_dir>/adapter of jobs/finetune.py)")
    cls.add_argument("--adapter", default=None, help="same as --model (the folder holding adapter + head)")
    cls.add_argument("--base", default=None, help="base model folder, if not the one recorded at training")
    cls.add_argument("--task", required=True)
    cls.add_argument("--data", required=True)
    cls.add_argument("--format", default=None, help="reader (default: the task's)")
    cls.add_argument("--ids", default=None, help="file of record ids to score (one per line), e.g. a dev split")
    cls.add_argument("--max-length", type=int, default=256)
    cls.add_argument("--bootstrap", type=int, default=1000)
    qa = tasks.add_parser("qa", help="QA accuracy of a causal LM in top_token, cot or sc_cot mode")
    qa.add_argument("--model", required=True, help="causal LM folder (with its tokenizer)")
    qa.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT format) to apply")
    qa.add_argument("--data", required=True, help="QA file")
    qa.add_argument("--format", required=True, help="medqa, medmcqa or pubmedqa")
    qa.add_argument("--mode", default="top_token", help="top_token, cot or sc_cot")
    qa.add_argument("--shots", type=int, default=0, help="few-shot exemplars per question")
    qa.add_argument("--shots-file", default=None, help="exemplar pool, e.g. a training split (needed with --shots)")
    qa.add_argument("--seed", type=int, default=0)
    qa.add_argument("--n", type=int, default=5, help="samples per question for sc_cot")
    qa.add_argument("--temperature", type=float, default=0.8, help="sampling temperature for sc_cot")
    qa.add_argument("--max-new-tokens", type=int, default=128)
    qa.add_argument("--limit", type=int, default=None, help="only the first N questions")
    qa.add_argument("--batch-size", type=int, default=8)
    qa.add_argument("--predictions", default="qa_predictions.jsonl", help="per-item predictions file (JSONL)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        from ray_med.runtime import setup_logging

        setup_logging("WARNING")
        if args.command == "perplexity":
            from ray_med.evaluation.lm_eval import perplexity_task

            metrics = perplexity_task(
                args.model, args.data, args.format, seq_len=args.seq_len, batch_size=args.batch_size,
                max_sequences=args.max_sequences, options=_options(args.option),
            )
        elif args.command == "qa":
            from ray_med.config import from_dict
            from ray_med.evaluation.qa import QAConfig
            from ray_med.evaluation.qa_eval import qa_task

            cfg = from_dict(QAConfig, {"mode": args.mode, "shots": args.shots, "seed": args.seed, "n": args.n,
                                       "temperature": args.temperature, "max_new_tokens": args.max_new_tokens},
                            where="evaluate qa")
            metrics = qa_task(args.model, args.data, args.format, cfg, adapter=args.adapter,
                              shots_file=args.shots_file, predictions=args.predictions, limit=args.limit,
                              batch_size=args.batch_size)
        else:
            from pathlib import Path

            from ray_med.evaluation.classify_eval import classify_task

            ids = set(Path(args.ids).read_text().split()) if args.ids else None
            metrics = classify_task(
                args.adapter or args.model, args.task, args.data, args.format, base_path=args.base,
                max_length=args.max_length, bootstrap=args.bootstrap, ids=ids,
            )
    except RayMedError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
