"""Deploy a Serve config in process, send one request to every endpoint, print the answers; then stop.

    python jobs/serve_check.py --config jobs/configs/serve_check/tiny.yaml \\
        args.model=runs/pretrain-xxxx/model 'args.classifiers={pubmedqa_rf: runs/finetune-xxxx/adapter}'

To keep an app up, use `serve run` on a Serve config (this job writes the filled-in one).
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "serve_check")


if __name__ == "__main__":
    sys.exit(main())
