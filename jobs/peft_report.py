"""Trainable parameters per PEFT method, on the meta device (no weights), as a markdown table and JSON.

    python jobs/peft_report.py --config jobs/configs/peft_report/llama2_7b_table2.yaml
    python jobs/peft_report.py --config jobs/configs/peft_report/llama2_7b_table2.yaml model.preset=llama2-70b

The JSON object is the last line of stdout.
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "peft_report")


if __name__ == "__main__":
    sys.exit(main())
