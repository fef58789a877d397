"""Named model presets: tiny models for the demo and tests, real-size shapes for planning.

This module owns the preset registry (:data:`PRESETS`), building a preset with random
init (:func:`build_model`), counting parameters, and the ZeRO memory arithmetic
(:func:`memory_plan`). Tiny presets build on CPU in milliseconds. Real-size presets
(Llama-2 7B/13B/70B, Meditron 7B/70B, a ~1.1B Llama) build on the meta device, which
allocates nothing, so parameter counts and memory plans need no weights. Loading real
weights is :mod:`ray_med.models.loading`'s job.

torch and transformers are imported inside the functions that need them: the registry
itself is plain Python, so :class:`~ray_med.models.config.ModelConfig` can check a
preset name while a job config is parsed without paying for those imports.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ray_med.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedConfig

Family = Literal["causal_lm", "vit", "encoder", "vlm"]


@dataclass(frozen=True)
class Preset:
    """A named model shape."""

    name: str
    """The name jobs use in ``model.preset``."""
    family: Family
    """causal_lm (decoder LM), vit (image encoder), encoder (BERT-style text encoder) or vlm (LLaVA: vision tower
    + projector + causal LM, :mod:`ray_med.models.vlm`)."""
    description: str
    """One line for listings and ``--help``."""
    make_config: Callable[..., PreTrainedConfig]
    """Builds the transformers config; takes ``vocab_size=`` (text) or ``num_labels=`` (vit, encoder)."""


def _llama(**shape: Any) -> Callable[..., PreTrainedConfig]:
    def make(*, vocab_size: int | None = None) -> PreTrainedConfig:
        from transformers import LlamaConfig  # lazy: the preset table is read while a config parses

        kwargs = dict(shape)
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        return LlamaConfig(**kwargs)

    return make


def _tiny_vit(*, num_labels: int | None = None) -> PreTrainedConfig:
    from transformers import ViTConfig  # lazy: as above

    cfg = ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128,
    )
    if num_labels is not None:
        cfg.num_labels = num_labels
    return cfg


def _tiny_bert(*, vocab_size: int | None = None, num_labels: int | None = None) -> PreTrainedConfig:
    from transformers import BertConfig  # lazy: as above

    cfg = BertConfig(
        vocab_size=vocab_size or 2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512,
    )
    if num_labels is not None:
        cfg.num_labels = num_labels
    return cfg


def _siglip(**shape: Any) -> Callable[[], PreTrainedConfig]:
    def make() -> PreTrainedConfig:
        from transformers import SiglipVisionConfig  # lazy: as above

        return SiglipVisionConfig(**shape)

    return make


# The vision towers a vlm preset can take (model.vision in a multimodal config). SigLIP
# has no CLS token, so every patch becomes an image token ("full" feature selection).
VISION_TOWERS: dict[str, Callable[[], PreTrainedConfig]] = {
    # 28x28 input (MedMNIST's size) in 16 patches of 7x7: 16 image tokens.
    "tiny-siglip": _siglip(image_size=28, patch_size=7, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_channels=3),
    # SigLIP so400m/14 (Alabdulmohsin et al., 2023) at Med-PaLM M's 224 px: 256 image tokens.
    "siglip-so400m-224": _siglip(image_size=224, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                 num_hidden_layers=27, num_attention_heads=16, num_channels=3),
}


def _vlm(vision: str, text: Callable[..., PreTrainedConfig]) -> Callable[..., PreTrainedConfig]:
    def make(*, vocab_size: int | None = None, num_labels: int | None = None) -> PreTrainedConfig:
        from transformers import LlavaConfig  # lazy: as above

        if num_labels is not None:
            raise ModelError("a vlm preset answers in text; num_labels applies to vit and encoder presets")
        v = VISION_TOWERS[vision]()
        n_tokens = (v.image_size // v.patch_size) ** 2
        t = text(vocab_size=vocab_size)
        # The image token is the last id until a tokenizer gives it its own (models.vlm.build_vlm).
        return LlavaConfig(vision_config=v, text_config=t, image_token_index=t.vocab_size - 1,
                           image_seq_length=n_tokens, vision_feature_select_strategy="full", vision_feature_layer=-1,
                           projector_hidden_act="gelu", tie_word_embeddings=False)

    return make


# Llama-2 shapes from the published configs (Touvron et al., 2023). Llama-2 uses
# rms_norm_eps 1e-5 where LlamaConfig defaults to 1e-6; it changes no shape but keeps
# a loaded checkpoint and a built preset numerically alike.
_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
_LLAMA2_7B = dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32)
_LLAMA2_13B = dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                   num_attention_heads=40, num_key_value_heads=40)
_LLAMA2_70B = dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8)
# Meditron continues Llama-2's pretraining without changing the architecture. Its
# model card gives a 2K context for the 7B; its exact vocabulary (the released
# tokenizer may add a few chat special tokens) is not verified here, so the presets
# keep Llama-2's 32000. Load the checkpoint folder when exact shapes matter.
_MEDITRON_NOTE = "vocab kept at Llama-2's 32000 (unverified; load the checkpoint for exact shapes)"

_TINY_LLAMA = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, vocab_size=2048, tie_word_embeddings=False)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny-llama", "causal_lm",
            "2-layer Llama, hidden 64, GQA 4/2 heads, 512 positions, vocab 2048 (or the tokenizer's)",
            _llama(**_TINY_LLAMA),
        ),
        Preset("tiny-vit", "vit", "2-layer ViT for 28x28 grey images (16 patches of 7x7), hidden 64", _tiny_vit),
        Preset("tiny-bert", "encoder", "2-layer BERT encoder, hidden 64, vocab 2048 (or the tokenizer's)",
               _tiny_bert),
        Preset("tiny-vlm", "vlm", "tiny-siglip tower (28 px, 16 image tokens) + projector + tiny-llama (LLaVA)",
               _vlm("tiny-siglip", _llama(**_TINY_LLAMA))),
        Preset(
            "llama-1b", "causal_lm", "~1.1B Llama (TinyLlama-1.1B shape: 22 layers, hidden 2048, GQA 32/4)",
            _llama(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                   tie_word_embeddings=False),
        ),
        Preset("llama2-7b", "causal_lm", "Llama-2-7B shape (6.74B parameters)", _llama(**_LLAMA2_7B)),
        Preset("llama2-13b", "causal_lm", "Llama-2-13B shape (13.0B parameters)", _llama(**_LLAMA2_13B)),
        Preset("llama2-70b", "causal_lm", "Llama-2-70B shape (69.0B parameters, GQA 64/8)", _llama(**_LLAMA2_70B)),
        Preset("meditron-7b", "causal_lm", f"Meditron-7B: Llama-2-7B shape, 2K context; {_MEDITRON_NOTE}",
               _llama(**dict(_LLAMA2_7B, max_position_embeddings=2048))),
        Preset("meditron-70b", "causal_lm", f"Meditron-70B: Llama-2-70B shape, 4K context; {_MEDITRON_NOTE}",
               _llama(**_LLAMA2_70B)),
        Preset("medpalm-m-7b", "vlm", "Med-PaLM M-style layout: SigLIP so400m/14 at 224 px (256 image tokens) + "
               "projector + Llama-2-7B (LLaVA)", _vlm("siglip-so400m-224", _llama(**_LLAMA2_7B))),
    ]
}


def list_presets() -> list[str]:
    """The preset names, in registry order (tiny ones first)."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ModelError with the valid names and a suggestion otherwise."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ModelError(f"unknown model preset '{name}'.{hint} Valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, *, vocab_size: int | None = None, num_labels: int | None = None) -> PreTrainedConfig:
    """The transformers config of a preset, with its vocabulary size or label count overridden."""
    preset = get_preset(name)
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
        raise ModelError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise ModelError(f"num_labels must be a positive integer, got {num_labels!r}")
    if preset.family == "vit":
        if vocab_size is not None:
            raise ModelError(f"preset '{name}' is an image model and has no vocabulary; drop vocab_size")
        return preset.make_config(num_labels=num_labels)
    if preset.family in ("causal_lm", "vlm"):
        if num_labels is not None:
            raise ModelError(f"preset '{name}' is a {preset.family}; num_labels applies to vit and encoder presets")
        return preset.make_config(vocab_size=vocab_size)
    return preset.make_config(vocab_size=vocab_size, num_labels=num_labels)


def build_model(
    preset: str,
    *,
    vocab_size: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    num_labels: int | None = None,
) -> torch.nn.Module:
    """Build a preset with random init; ``device="meta"`` allocates no memory at all.

    Causal-LM presets become ``LlamaForCausalLM``. ``tiny-vit`` becomes ``ViTModel``, or
    ``ViTForImageClassification`` when ``num_labels`` is given; ``tiny-bert`` likewise
    becomes ``BertModel`` or ``BertForSequenceClassification``.
    """
    # lazy: torch and transformers load only when a model is built, not when a config is checked
    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    family = get_preset(preset).family
    config = preset_config(preset, vocab_size=vocab_size, num_labels=num_labels)
    if family == "causal_lm":
        auto: Any = AutoModelForCausalLM
    elif family == "vlm":
        auto = AutoModelForImageTextToText
    elif num_labels is None:
        auto = AutoModel
    else:
        auto = AutoModelForImageClassification if family == "vit" else AutoModelForSequenceClassification
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"bad device {device!r} for preset '{preset}': {exc}") from None
    # Creating the modules under the device context (and the dtype as the default
    # dtype, which from_config does) puts each weight where it belongs on first
    # allocation: no fp32 CPU copy to move, and nothing at all on "meta".
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with target:
        return auto.from_config(config, **kwargs)


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters; works on meta-device models.

    ``Module.parameters()`` yields a tied tensor once, so tied embeddings count once.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def memory_plan(
    n_params: int,
    *,
    param_bytes: int = 2,
    zero_stage: int = 0,
    num_gpus: int = 1,
    offload_optimizer: bool = False,
) -> dict[str, float]:
    """Bytes per GPU for weights, gradients and optimizer state under ZeRO data parallelism.

    Follows Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models" (SC 2020), section 5 and figure 1. With Ψ parameters, Nd GPUs and
    mixed-precision Adam, each GPU holds 2Ψ bytes of weights, 2Ψ of gradients and KΨ of
    optimizer state, K = 12 (fp32 master weights, momentum and variance, 4 bytes each):

    - stage 0 (plain data parallel): (2 + 2 + K)Ψ
    - stage 1 (optimizer state partitioned): 2Ψ + 2Ψ + KΨ/Nd
    - stage 2 (also gradients): 2Ψ + (2 + K)Ψ/Nd
    - stage 3 (also weights): (2 + 2 + K)Ψ/Nd

    ``param_bytes`` replaces the 2 bytes of weights and of gradients. With
    ``param_bytes=4`` (pure fp32 training) the weights are their own master copy, so K
    drops to 8. ``offload_optimizer`` (ZeRO-Offload) moves this GPU's optimizer shard to
    CPU memory, reported as ``cpu_optimizer``. Activations, buffers, communication
    buckets and fragmentation are not included: this is a lower bound.

    Returns ``weights``, ``gradients``, ``optimizer``, ``total`` (bytes on each GPU) and
    ``cpu_optimizer`` (bytes of host memory per GPU).
    """
    if n_params < 0:
        raise ModelError(f"n_params must be >= 0, got {n_params}")
    if param_bytes not in (1, 2, 4):
        raise ModelError(f"param_bytes must be 1, 2 or 4, got {param_bytes}")
    if zero_stage not in (0, 1, 2, 3):
        raise ModelError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if num_gpus < 1:
        raise ModelError(f"num_gpus must be >= 1, got {num_gpus}")
    if offload_optimizer and zero_stage == 0:
        # DeepSpeed only offloads the optimizer when it partitions it (stage >= 1).
        raise ModelError("offload_optimizer needs zero_stage 1, 2 or 3")
    optimizer_bytes = 12 if param_bytes < 4 else 8
    weights = float(n_params * param_bytes)
    grads = float(n_params * param_bytes)
    optim = float(n_params * optimizer_bytes)
    if zero_stage >= 1:
        optim /= num_gpus
    if zero_stage >= 2:
        grads /= num_gpus
    if zero_stage >= 3:
        weights /= num_gpus
    cpu_optim = 0.0
    if offload_optimizer:
        optim, cpu_optim = 0.0, optim
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "total": weights + grads + optim,
        "cpu_optimizer": cpu_optim,
    }
