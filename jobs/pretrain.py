"""Continued pretraining (Meditron recipe) with Ray Train + DeepSpeed ZeRO.

Locally (tiny preset, CPU, the real data in ../shared/data):

    python jobs/pretrain.py --config jobs/configs/pretrain/tiny.yaml
    python jobs/pretrain.py --config jobs/configs/pretrain/tiny.yaml scaling.num_workers=2 deepspeed.zero_stage=2

On a cluster:

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/pretrain.py --config jobs/configs/pretrain/llama2_7b_gap.yaml run.storage=s3://bucket/runs

Resubmitting the same command resumes from the run's latest checkpoint.
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "pretrain")


if __name__ == "__main__":
    sys.exit(main())
