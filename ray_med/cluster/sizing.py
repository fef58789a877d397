"""GPU sizing of a job config from :func:`ray_med.models.memory_plan`: model state per GPU, before you rent.

``python -m ray_med.cluster.sizing CONFIG [CONFIG ...] [--preset NAME]`` prints, per job
config, the base model's parameters, what the job trains, and the bytes each GPU holds for
weights, gradients and optimizer state under the config's data parallelism (ZeRO stage
and worker count for pretraining, with the job's own defaults; a frozen base plus trainable
adapters otherwise, an M3OE gate's few parameters left out), and the smallest common GPU whose memory that leaves at least :data:`HEADROOM` free for activations.

It reads the config's YAML only for the fields that decide memory (``model`` or ``llm``, ``adapter``
or ``model.lora``, ``deepspeed``, ``scaling``; a sweep's ``base``) and builds the model on
PyTorch's meta device, so a 70B model costs no memory. A config whose model is a folder
that is not on this machine (``/mnt/models/...``) is sized from ``--preset`` (a preset of
the same shape, e.g. llama2-7b). This is a lower bound: activations, buffers, the
communication buckets and fragmentation are not counted, hence the headroom.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ray_med.errors import EXIT_USER_ERROR, ConfigError, RayMedError
from ray_med.models.config import ModelConfig
from ray_med.training.config import DeepSpeedSettings

GPUS: list[tuple[str, float]] = [("L4 24GB", 24e9), ("A100 40GB", 40e9), ("A100/H100 80GB", 80e9),
                                 ("H200 141GB", 141e9)]
"""Common data-centre GPUs by memory, smallest first."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

HEADROOM = 0.4
"""Share of a GPU's memory left free for activations and buffers when picking a GPU."""


@dataclass
class Sizing:
    config: str
    model: str
    params: int
    trainable: int
    workers: int
    zero_stage: int
    per_gpu: dict[str, float]
    gpu: str

    def line(self) -> str:
        gb = {k: v / 1e9 for k, v in self.per_gpu.items()}
        return (f"{self.config}: {self.model} {self.params / 1e9:.2f}B params, {self.trainable / 1e6:.1f}M trained, "
                f"{self.workers} GPU workers, ZeRO {self.zero_stage}: {gb['total']:.1f} GB/GPU of model state "
                f"(weights {gb['weights']:.1f}, grads {gb['gradients']:.1f}, optimizer {gb['optimizer']:.1f}"
                + (f", CPU optimizer {gb['cpu_optimizer']:.1f}" if gb["cpu_optimizer"] else "") + f") -> {self.gpu}")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if "base" in data:  # a sweep: its trials are the base config plus the sweep's overrides
        base = _read(Path(data["base"]))
        for override in data.get("overrides", []):
            key, _, value = override.partition("=")
            part = base
            *parents, leaf = key.split(".")
            for k in parents:
                part = part.setdefault(k, {})
            part[leaf] = yaml.safe_load(value)
        return base
    return data


def _meta(model: dict[str, Any], preset: str | None) -> tuple[Any, str]:
    # lazy: torch and transformers load only when a config is sized, not for --help
    from ray_med.training.preflight import meta_model

    path = model.get("path") or model.get("language_model")
    if path and not Path(path).exists():
        if not preset:
            raise ConfigError(f"model folder {path} is not on this machine; size it with --preset NAME "
                              "(a preset of the same shape, e.g. llama2-7b)")
        path = None
    name = path or model.get("preset") or preset
    if not name:
        raise ConfigError("the config names no model (model.path or model.preset); pass --preset NAME")
    cfg = ModelConfig(preset=None, path=path) if path else ModelConfig(preset=name)
    return meta_model(cfg, causal_lm=True), str(name)


def _lora_params(model: Any, r: int, targets: list[str], copies: int = 1, within: str = "") -> int:
    """Parameters of rank-``r`` LoRA on every Linear named in ``targets`` (A: r x in, B: out x r)
    whose path contains ``within`` (a multimodal model's LoRA is on its language model only)."""
    import torch  # lazy: see _meta

    return copies * sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets and within in name)


def _projector_params(model: Any) -> int:
    """A multimodal model's projector, trained beside its LoRA (``modules_to_save``)."""
    return sum(p.numel() for name, p in model.named_parameters() if "multi_modal_projector" in name)


def size(config: str | Path, *, preset: str | None = None) -> Sizing:
    from ray_med.models import count_parameters, memory_plan  # lazy: see _meta

    data = _read(Path(config))
    model_cfg = data.get("model") or data.get("llm") or {}  # jobs/inject.py calls its model llm
    model, name = _meta(model_cfg, preset)
    params = count_parameters(model)
    scaling = data.get("scaling") or {}
    workers = int(scaling.get("num_workers", 1)) or 1
    lora = data.get("adapter") or model_cfg.get("lora")
    if lora is None or model_cfg.get("phase") == "full":  # full training: weights, grads, Adam, sharded by ZeRO
        ds = {**asdict(DeepSpeedSettings()), **(data.get("deepspeed") or {})}  # the job's own defaults
        offload = bool(ds["offload_optimizer"])
        # With one worker and no offload the job runs ZeRO stage 0 (nothing to partition).
        stage = int(ds["zero_stage"]) if workers > 1 or offload else 0
        param_bytes = 4 if ds["precision"] == "fp32" else 2  # auto is bf16 on a GPU
        plan = memory_plan(params, param_bytes=param_bytes, zero_stage=stage, num_gpus=workers,
                           offload_optimizer=offload)
        trainable = params
    else:  # a frozen base in its dtype plus trainable adapters in fp32 with Adam (data parallel, unsharded)
        stage = 0
        dtype_bytes = DTYPE_BYTES[model_cfg.get("dtype", ModelConfig.dtype)]
        copies = int(lora.get("experts", 1)) if lora.get("method") == "m3oe" else 1  # one LoRA per expert
        vlm = model_cfg.get("lora") is not None  # jobs/multimodal.py: LoRA on the language model + the projector
        trainable = _lora_params(model, int(lora.get("r", 8)), list(lora.get("target_modules", [])), copies,
                                 within="language_model" if vlm else "")
        trainable += _projector_params(model) if vlm else 0
        adapters = memory_plan(trainable, param_bytes=4)
        plan = {**adapters, "weights": adapters["weights"] + params * dtype_bytes,
                "total": adapters["total"] + params * dtype_bytes}
    gpu = next((g for g, mem in GPUS if plan["total"] <= (1 - HEADROOM) * mem), "does not fit one GPU: raise zero_stage or workers")
    return Sizing(str(config), name, params, trainable, workers, stage, plan, gpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_med.cluster.sizing", description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", help="job config YAML files")
    parser.add_argument("--preset", help="preset of the same shape, for a model folder not on this machine")
    args = parser.parse_args(argv)
    try:
        for config in args.configs:
            print(size(config, preset=args.preset).line())
    except RayMedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
