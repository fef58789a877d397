"""The multimodal model (Med-PaLM M's shape as LLaVA): vision tower + projector + causal LM, built, phased, saved, loaded.

The model is transformers' ``LlavaForConditionalGeneration``: an image placeholder
token (``<image>``) in the text expands to N image tokens, whose embeddings the
projector computes from the tower's patch features. Using the LLaVA classes rather than
our own module means the folder this project writes loads with plain
``AutoModelForImageTextToText.from_pretrained`` (and vLLM serves it); the tests check
that its logits equal the in-memory model's.

A model comes from one of three places (:class:`VLMConfig`):

* ``path``: a LLaVA folder written by this project (or any LLaVA checkpoint);
* ``language_model`` (+ ``vision``): an existing causal-LM folder, e.g. this project's
  pretrained model, with a vision tower preset or a vision-model folder; the
  ``<image>`` token is added to its tokenizer and its embeddings grow by one row;
* ``preset``: a vlm preset with random init (``tiny-vlm``; ``medpalm-m-7b`` on the meta
  device for parameter counts and memory plans).

Phases (LLaVA-Med's two stages, and a LoRA variant): ``projector`` trains the projector
alone, ``full`` trains everything (Med-PaLM M), ``lora`` trains a LoRA of the language
model plus the projector; :func:`export_model` merges that LoRA back, so every phase
writes the same kind of folder.

Images reach the tower through :func:`ray_med.data.images.preprocess` everywhere
(training, evaluation, serving), sized by :func:`image_geometry`; the processor saved beside the weights
(``LlavaProcessor`` with ``LlavaImageProcessor``: pad to square with the mean colour,
resize, normalise) is for users of plain transformers, and matches it up to resampling
rounding.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ray_med.errors import ConfigError, ModelError
from ray_med.models.presets import PRESETS, VISION_TOWERS, get_preset, preset_config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IMAGE_TOKEN = "<image>"
"""The placeholder a prompt carries where an image goes; it expands to the tower's N image tokens."""
EXEMPLAR_IMAGE = "<img>"
"""What a text-only exemplar carries instead of an image: plain text, no pixels (Med-PaLM M)."""
PHASES = ("projector", "full", "lora")
Phase = Literal["projector", "full", "lora"]


@dataclass
class VLMLoRA:
    """The LoRA of the language model in phase ``lora``."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class VLMConfig:
    """Which multimodal model a job builds or loads, and what it trains."""

    preset: str | None = "tiny-vlm"
    """A vlm preset (tiny-vlm, medpalm-m-7b), used when neither path nor language_model is set."""
    path: str | None = None
    """A LLaVA folder (this project's <output_dir>/model) to continue from; wins over everything else."""
    language_model: str | None = None
    """A causal-LM folder with its tokenizer (e.g. pretraining's model) to put under a vision tower."""
    vision: str = "tiny-siglip"
    """With language_model: a vision tower preset (tiny-siglip, siglip-so400m-224) or a vision-model folder."""
    phase: str = "full"
    """projector: the projector only; full: every weight; lora: a LoRA of the LM plus the projector."""
    lora: VLMLoRA = field(default_factory=VLMLoRA)
    """The LoRA of phase lora."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"model.phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        if not (self.path or self.language_model or self.preset):
            raise ConfigError("model: set path, language_model or preset")
        if self.preset and not (self.path or self.language_model) and get_preset(self.preset).family != "vlm":
            vlms = _vlm_presets()
            raise ConfigError(f"model.preset {self.preset!r} is not a multimodal preset; use one of {', '.join(vlms)} "
                              "or set model.language_model to put a causal LM under a vision tower")
        if self.language_model and not self.path and self.vision not in VISION_TOWERS \
                and not (Path(self.vision) / "config.json").is_file():
            raise ConfigError(f"model.vision {self.vision!r} is neither a vision tower preset "
                              f"({', '.join(VISION_TOWERS)}) nor a folder with a config.json")


def _vlm_presets() -> list[str]:
    return [n for n, p in PRESETS.items() if p.family == "vlm"]


def is_vlm_folder(path: str | Path) -> bool:
    """True when ``path`` holds a LLaVA-family model (its config's model_type is llava)."""
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give the tokenizer its ``<image>`` special token (once) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def image_tokens(config: Any) -> int:
    """N, the image tokens one image becomes (SigLIP: every patch)."""
    return _n_tokens(config.vision_config, getattr(config, "vision_feature_select_strategy", "full"))


def _n_tokens(v: Any, strategy: str) -> int:
    n = (v.image_size // v.patch_size) ** 2
    if strategy == "full" and v.model_type == "clip_vision_model":
        n += 1  # CLIP's CLS token, kept by the "full" strategy
    return n


def image_geometry(config: Any) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """(size, mean, std) of this model's tower: ``ImageSpec(*image_geometry(config))`` prepares its images.

    SigLIP normalises with mean = std = 0.5, CLIP with OpenAI's statistics.
    """
    v = config.vision_config
    if v.model_type == "clip_vision_model":
        return v.image_size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return v.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _vision_model(vision: str, dtype: torch.dtype | None) -> tuple[Any, PreTrainedModel | None]:
    """(vision config, pretrained tower or None) for a tower preset or a vision-model folder."""
    if vision in VISION_TOWERS:
        return VISION_TOWERS[vision](), None
    from transformers import AutoModel  # lazy: transformers loads only when a model is built

    from ray_med.models.loading import load_pretrained  # lazy: configs parse without torch

    tower = load_pretrained(AutoModel, vision, "vision tower folder", dtype=dtype)
    if hasattr(tower, "vision_model") and not hasattr(tower, "embeddings"):  # a full SigLIP/CLIP: keep its tower
        tower = tower.vision_model
    cfg = getattr(tower.config, "vision_config", tower.config)
    return cfg, tower


def build_vlm(cfg: VLMConfig, tokenizer: PreTrainedTokenizerBase, *, device: str = "cpu") -> PreTrainedModel:
    """The model ``cfg`` names, its ``<image>`` token set from ``tokenizer`` (which gets it if missing).

    ``device="meta"`` builds a preset with no memory (parameter counts, memory plans).
    """
    import torch  # lazy: configs parse without torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration  # lazy: configs parse without torch

    from ray_med.models.loading import (  # lazy: configs parse without torch
        load_causal_lm,
        load_pretrained,
        resolve_dtype,
    )

    dtype = resolve_dtype(cfg.dtype)
    image_id = add_image_token(tokenizer)
    if cfg.path:
        model = load_pretrained(LlavaForConditionalGeneration, cfg.path, "multimodal model folder", dtype=dtype)
        if model.config.image_token_id != image_id:
            raise ModelError(f"the model at {cfg.path} uses image token id {model.config.image_token_id}, its "
                             f"tokenizer {image_id}: use the tokenizer saved with that model")
        return model.to(device)
    if cfg.language_model:
        lm = load_causal_lm(cfg.language_model, dtype=dtype)
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer))  # the new <image> row (never looked up: it is replaced)
        vision_cfg, tower = _vision_model(cfg.vision, dtype)
        config = LlavaConfig(vision_config=vision_cfg, text_config=lm.config, image_token_index=image_id,
                             image_seq_length=_n_tokens(vision_cfg, "full"),
                             vision_feature_select_strategy="full", vision_feature_layer=-1,
                             projector_hidden_act="gelu", tie_word_embeddings=lm.config.tie_word_embeddings)
        model = LlavaForConditionalGeneration(config).to(dtype or torch.float32)
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
        if tower is not None:
            try:
                model.model.vision_tower.load_state_dict(tower.state_dict())
            except RuntimeError as exc:  # a tower whose weights do not fit: never train a random one by mistake
                raise ModelError(f"model.vision {cfg.vision}: its weights do not fit the tower "
                                 f"({str(exc).splitlines()[0]})") from None
        return model.to(device)
    assert cfg.preset is not None
    config = preset_config(cfg.preset, vocab_size=len(tokenizer))
    config.image_token_id = image_id
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device(device):
        return LlavaForConditionalGeneration._from_config(config, **kwargs)


def set_phase(model: PreTrainedModel, phase: str, lora: VLMLoRA | None = None) -> torch.nn.Module:
    """Freeze what the phase does not train; phase ``lora`` returns the PEFT-wrapped model."""
    if phase not in PHASES:
        raise ConfigError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if phase == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if phase == "projector":
        model.model.multi_modal_projector.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model  # lazy: only phase lora needs PEFT

    lora = lora or VLMLoRA()
    names = "|".join(lora.target_modules)
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          # the language model's layers only, not the tower's same-named projections
                          target_modules=rf".*language_model.*\.({names})",
                          modules_to_save=["multi_modal_projector"])
    return get_peft_model(model, peft_cfg)


def export_model(model: torch.nn.Module) -> PreTrainedModel:
    """The plain LLaVA model to save: a phase-``lora`` model with its LoRA merged in (a copy; training keeps its own)."""
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "save_pretrained"):
        inner = inner.module  # DDP
    if hasattr(inner, "merge_and_unload"):
        return copy.deepcopy(inner).merge_and_unload()
    return inner


def make_processor(tokenizer: PreTrainedTokenizerBase, config: Any) -> Any:
    """A ``LlavaProcessor`` for plain-transformers users, preparing images as :func:`~ray_med.data.images.preprocess` does."""
    from transformers import LlavaProcessor  # lazy: configs parse without torch
    from transformers.models.llava.image_processing_pil_llava import (  # lazy: configs parse without torch
        LlavaImageProcessorPil,  # PIL and numpy: no torchvision (the default class needs it)
    )

    side, mean, std = image_geometry(config)
    size = {"height": side, "width": side}
    images = LlavaImageProcessorPil(do_pad=True, size=size, crop_size=size,
                                 do_center_crop=False, image_mean=list(mean), image_std=list(std),
                                 do_convert_rgb=True)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=image_tokens(config) - _n_tokens(config.vision_config, "default"),
                          image_token=IMAGE_TOKEN)


def save_vlm(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write a loadable HF folder: weights (safetensors), config, tokenizer and processor."""
    from ray_med.models.loading import save_pretrained  # lazy: configs parse without torch

    plain = export_model(model)
    out = save_pretrained(plain, out_dir, tokenizer)
    make_processor(tokenizer, plain.config).save_pretrained(str(out))
    return out


def load_vlm(path: str | Path, *, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, Any]:
    """(model in eval mode, tokenizer) of a LLaVA folder; a clear error when it is not one."""
    from transformers import LlavaForConditionalGeneration  # lazy: configs parse without torch

    from ray_med.models.loading import load_pretrained, load_tokenizer  # lazy: configs parse without torch

    if not is_vlm_folder(path):
        raise ModelError(f"{path}: not a multimodal (LLaVA) model folder")
    model = load_pretrained(LlavaForConditionalGeneration, str(path), "multimodal model folder", dtype=dtype)
    return model.eval(), load_tokenizer(path)
