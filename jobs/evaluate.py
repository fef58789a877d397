"""Offline evaluation of the models the jobs produce; the metrics are one JSON object on the last stdout line.

    python jobs/evaluate.py perplexity --model runs/pretrain-xxxx/model \\
        --data ../shared/data/pubmedqa/pqal_trainval.json --format pubmedqa
    python jobs/evaluate.py classify --model runs/finetune-xxxx/adapter --task pubmedqa_rf \\
        --data ../shared/data/pubmedqa/pqal_trainval.json --format pubmedqa
    python jobs/evaluate.py qa --model DIR [--adapter LORA_DIR] \\
        --data ../shared/data/pubmedqa/pqal_trainval.json --format pubmedqa --mode sc_cot
    python jobs/evaluate.py federated --model runs/federated-xxxx/global --task pneumonia \\
        --data ../shared/data/pneumoniamnist/pneumoniamnist_trainval.npz --format medmnist --split val
    python jobs/evaluate.py qa --config my_eval.yaml qa.n=9      # every task takes a YAML and key=value too

Tasks: ``perplexity`` (any causal-LM folder, any corpus file and reader format),
``classify`` (a classifier folder written by ``jobs/finetune.py``: base + adapters + head)
and ``qa`` (a causal LM, optionally with a LoRA adapter, on MedQA/MedMCQA/PubMedQA in
top_token, cot or sc_cot mode; the same code as the Serve app's /v1/qa). The flags are
aliases of config keys; ``evaluate.py TASK --help`` lists both.
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "evaluate", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
