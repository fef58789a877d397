"""The multimodal model (Med-PaLM M as LLaVA): vision tower + projector + LLM, trained on a task mixture.

    python jobs/multimodal.py --config jobs/configs/multimodal/tiny_pneumonia.yaml
    python jobs/multimodal.py --config jobs/configs/multimodal/tiny_pneumonia.yaml model.phase=lora

The model goes to <output_dir>/model (default: the run folder), an HF folder that
``LlavaForConditionalGeneration.from_pretrained`` loads; ``--help`` lists every key.
"""

import sys

from ray_med.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "multimodal")


if __name__ == "__main__":
    sys.exit(main())
