"""Knowledge injection (FedKIM, server side): the federated encoders projected into an LLM, with M3OE, FedPlug or FedPlugL.

    python jobs/inject.py --config jobs/configs/inject/tiny_m3oe.yaml federated.global_dir=runs/<federated run>/global
    python jobs/inject.py --config jobs/configs/inject/tiny_fedplugl.yaml federated.global_dir=... adapter.experts=8

Writes <output_dir>/model (the injected model), <output_dir>/adapter (the M3OE or LoRA
adapter), folded/<task>/ (M3OE: each task as a plain PEFT LoRA), metrics.json with the
seen and unseen tasks' test AUROC, and gate_stats.json; ``--help`` lists every key.
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "inject")


if __name__ == "__main__":
    sys.exit(main())
