"""Adapter fine-tuning (Clinical LLaMA-LoRA): stage 1 domain adapter, stage 2 downstream adapter + classifier.

    python jobs/finetune.py --config jobs/configs/finetune/tiny_domain.yaml model.path=runs/pretrain-xxxx/model
    python jobs/finetune.py --config jobs/configs/finetune/pubmedqa_rf_minilm_lora.yaml output_dir=DIR

The adapter goes to <output_dir>/adapter (default: the run folder); ``--help`` lists every key.
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "finetune")


if __name__ == "__main__":
    sys.exit(main())
