"""Federated hospitals (FedKIM, client side): virtual clients on a pool of Ray actors train modality encoders.

    python jobs/federated.py --config jobs/configs/federated/tiny_pneumonia_fedavg.yaml
    python jobs/federated.py --config jobs/configs/federated/tiny_pneumonia_fedprox.yaml rounds=20

The aggregated encoders go to <output_dir>/global/<modality>/ (safetensors + config.json),
the per-round log to rounds.json, the curves to plots/. Rerunning the same command resumes
after the last finished round; ``--help`` lists every key.
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "federated")


if __name__ == "__main__":
    sys.exit(main())
