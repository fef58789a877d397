"""The multimodal model: presets, building from a causal-LM folder, phases, and a saved folder plain transformers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ray_med.data.images import ImageSpec, preprocess
from ray_med.data.records import encode_png
from ray_med.errors import ConfigError
from ray_med.models import build_model, count_parameters, save_pretrained, train_bpe_tokenizer
from ray_med.models.vlm import (
    IMAGE_TOKEN,
    VLMConfig,
    add_image_token,
    build_vlm,
    image_geometry,
    image_tokens,
    is_vlm_folder,
    load_vlm,
    save_vlm,
    set_phase,
)

TEXTS = ["Given the chest X-ray <img>. Q: Which finding does the X-ray show? (A) normal (B) pneumonia A: B",
         "Instructions: You are a helpful radiology assistant. The lungs are clear."] * 20


@pytest.fixture(scope="module")
def tok() -> Any:
    t = train_bpe_tokenizer(TEXTS, vocab_size=300)
    add_image_token(t)
    return t


def _inputs(tok: Any, model: Any) -> dict[str, torch.Tensor]:
    n = image_tokens(model.config)
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tok("Given the chest X-ray", add_special_tokens=False)["input_ids"] + [img_id] * n + \
        tok(". Q: Which finding? A:", add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(0)
    image = encode_png(rng.integers(0, 255, (40, 30), dtype=np.uint8))  # non-square, grey
    px = torch.from_numpy(preprocess(image, ImageSpec(*image_geometry(model.config))))[None]
    return {"input_ids": torch.tensor([ids]), "pixel_values": px}


def test_tiny_vlm_preset_has_its_image_token_and_shapes(tok: Any) -> None:
    model = build_vlm(VLMConfig(preset="tiny-vlm"), tok)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN) == len(tok) - 1
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert image_tokens(model.config) == 16 and image_geometry(model.config)[0] == 28
    logits = model(**_inputs(tok, model)).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_real_size_layout_on_the_meta_device() -> None:
    model = build_model("medpalm-m-7b", device="meta")
    n = count_parameters(model)
    # Llama-2-7B (6.74B) + SigLIP so400m/14 (~0.43B) + a 2-layer projector (1152->4096->4096).
    assert 7.1e9 < n < 7.3e9
    assert image_tokens(model.config) == 256
    assert all(p.device.type == "meta" for p in model.parameters())


def test_an_lm_folder_under_a_vision_tower_keeps_its_weights(tmp_path: Path, tok: Any) -> None:
    plain = train_bpe_tokenizer(TEXTS, vocab_size=300)
    lm = build_model("tiny-llama", vocab_size=len(plain))
    save_pretrained(lm, tmp_path / "lm", plain)
    vlm = build_vlm(VLMConfig(preset=None, language_model=str(tmp_path / "lm"), vision="tiny-siglip"), plain)
    assert len(plain) == lm.config.vocab_size + 1  # <image> was added to the LM's tokenizer
    emb = vlm.get_input_embeddings().weight
    assert emb.shape[0] == len(plain)
    assert torch.equal(emb[:-1], lm.get_input_embeddings().weight)
    assert torch.equal(vlm.lm_head.weight[:-1], lm.lm_head.weight)
    layer = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(vlm.model.language_model.state_dict()[layer], lm.model.state_dict()[layer])


def test_phases_train_what_they_say(tok: Any) -> None:
    def trainable(m: torch.nn.Module) -> set[str]:
        return {n for n, p in m.named_parameters() if p.requires_grad}

    proj = set_phase(build_vlm(VLMConfig(), tok), "projector")
    assert trainable(proj) and all("multi_modal_projector" in n for n in trainable(proj))
    full = set_phase(build_vlm(VLMConfig(), tok), "full")
    assert trainable(full) == {n for n, _ in full.named_parameters()}
    lora = set_phase(build_vlm(VLMConfig(), tok), "lora")
    names = trainable(lora)
    assert any("lora_A" in n and "language_model" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)
    assert all("lora_" in n or "multi_modal_projector" in n for n in names)
    with pytest.raises(ConfigError, match="phase must be one of projector, full, lora"):
        set_phase(full, "everything")


@pytest.mark.parametrize("phase", ["full", "lora"])
def test_saved_folder_loads_with_plain_transformers_and_gives_the_same_logits(tmp_path: Path, tok: Any,
                                                                              phase: str) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = set_phase(build_vlm(VLMConfig(phase=phase), tok), phase)
    if phase == "lora":  # a LoRA that changes the output, so merging it must matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    model.eval()
    inputs = _inputs(tok, model)
    with torch.no_grad():
        expected = model(**inputs).logits
    save_vlm(model, tok, tmp_path / "model")
    assert is_vlm_folder(tmp_path / "model")
    for cls in (AutoModelForImageTextToText, LlavaForConditionalGeneration):
        loaded = cls.from_pretrained(str(tmp_path / "model")).eval()
        with torch.no_grad():
            got = loaded(**inputs).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ours, our_tok = load_vlm(tmp_path / "model")
    assert our_tok.convert_tokens_to_ids(IMAGE_TOKEN) == ours.config.image_token_id
    # The processor saved beside it expands <image> to the N image tokens and prepares
    # the image as ray_med.data.images.preprocess does (up to resampling rounding).
    proc = AutoProcessor.from_pretrained(str(tmp_path / "model"))
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30), dtype=np.uint8))
    out = proc(text=f"Given {IMAGE_TOKEN}. Q: A:", images=img, return_tensors="pt")
    assert int((out["input_ids"] == ours.config.image_token_id).sum()) == image_tokens(ours.config)
    ref = preprocess(img, ImageSpec(*image_geometry(ours.config)))
    assert np.abs(out["pixel_values"][0].numpy() - ref).mean() < 0.05


def test_a_text_only_folder_is_not_a_vlm(tmp_path: Path) -> None:
    assert not is_vlm_folder(tmp_path)
    with pytest.raises(Exception, match="not a multimodal"):
        load_vlm(tmp_path)
