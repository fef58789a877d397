"""A LoRA sweep on Ray Tune over the downstream (classifier) stage of jobs/finetune.py.

    python jobs/sweep.py --config jobs/configs/sweep/tiny.yaml "overrides=[model.path=runs/pretrain-xxxx/model]"
    python jobs/sweep.py --config jobs/configs/sweep/pubmedqa_rf_lora_asha.yaml

Rerunning the same command resumes an interrupted sweep. Outputs in <output_dir> (default:
the run folder): trials.csv, plots/, best/ (adapter, config.yaml, serve.yaml); ``--help``
lists every key.
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "sweep")


if __name__ == "__main__":
    sys.exit(main())
