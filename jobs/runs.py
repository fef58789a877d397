"""List the runs under a storage root: job, status (finished, failed, running, resumable), headline metric, lineage.

    python jobs/runs.py                     # runs/ (the default run.storage)
    python jobs/runs.py run.storage=s3://bucket/runs job=pretrain
    python jobs/runs.py json=true           # one JSON object per run
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "runs")


if __name__ == "__main__":
    sys.exit(main())
