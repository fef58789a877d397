"""The end-to-end ray_med pipeline; ``make demo`` runs it on an embedded local Ray.

Run it locally (tiny presets, the real data in ../shared/data):

    python jobs/pipeline.py --config jobs/configs/pipeline/tiny.yaml
    python jobs/pipeline.py --config jobs/configs/pipeline/tiny.yaml 'downstream.overrides=[train.epochs=5]'

A rerun reuses every stage that finished with the same config and inputs (`cached`);
``--help`` lists the stages and every config key.
"""

import sys

from ray_med.cli import run_job
from ray_med.pipeline.stages import describe_stages


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "pipeline", description=__doc__ + "\n" + describe_stages())


if __name__ == "__main__":
    sys.exit(main())
