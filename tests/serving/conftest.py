"""Serving fixtures: a tiny causal LM with two LoRA adapters, and two MiniLM classifiers.

Every adapter's LoRA ``B`` matrices are randomised (PEFT starts them at zero, which
would make an adapter a no-op), so two adapters really give different outputs.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def qa_texts() -> list[str]:
    """Prompt-shaped text for the tokenizer, so " A", " yes", ... become single tokens."""
    from ray_med.data import read_records
    from ray_med.tasks import build_prompt, item_from_record

    items = [item_from_record(r) for r in read_records("medqa", str(FIXTURES / "medqa.jsonl")).records]
    items += [item_from_record(r) for r in read_records("medmcqa", str(FIXTURES / "medmcqa.jsonl")).records]
    texts = [build_prompt(it, items[:2], "top_token") + f" {it.answer}" for it in items] + cot_texts()
    texts += [f"Question: is it? Options: yes, no, maybe\nAnswer: {a} the answer is {a}" for a in ("yes", "no", "maybe")]
    texts += [f"Answer: {c} the answer is {c}" for c in "ABCDE"]
    return texts * 20


def cot_texts() -> list[str]:
    """Chain-of-thought answers to the fixture questions, to teach the tiny model the format."""
    from ray_med.data import read_records
    from ray_med.tasks import build_prompt, item_from_record

    items = [item_from_record(r) for r in read_records("medqa", str(FIXTURES / "medqa.jsonl")).records]
    return [build_prompt(it, [], "cot") + f" {it.options[it.answer]} fits. Therefore, the answer is {it.answer}."
            for it in items]


def teach(model: torch.nn.Module, tok, texts: list[str], steps: int = 60) -> None:
    """A few steps of causal-LM training so CoT rationales end in an extractable answer."""
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def randomise_lora(model: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def build_lm(out: Path) -> dict[str, Path]:
    """``out/lm`` (tiny Llama + tokenizer) and LoRA adapters ``out/lora_a``, ``out/lora_b``."""
    import peft

    from ray_med.models import build_model, save_pretrained, train_bpe_tokenizer

    tok = train_bpe_tokenizer(qa_texts(), vocab_size=600, min_frequency=2)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = build_model("tiny-llama", vocab_size=len(tok))
    teach(model, tok, cot_texts())
    lm_dir = save_pretrained(model, out / "lm", tokenizer=tok)
    paths = {"lm": lm_dir}
    for i, name in enumerate(("lora_a", "lora_b")):
        from ray_med.models import load_causal_lm

        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
        model = peft.get_peft_model(load_causal_lm(lm_dir), cfg)
        randomise_lora(model, seed=i + 1, scale=0.1)  # perturbs the answers, keeps the format
        model.save_pretrained(str(out / name))
        paths[name] = out / name
    return paths


def build_classifiers(out: Path, minilm: Path) -> dict[str, Path]:
    """Two LoRA + head classifiers over the real MiniLM encoder (shared base when served)."""
    from ray_med.adapters.classifier import save_classifier
    from ray_med.adapters.config import AdapterConfig
    from ray_med.adapters.stacking import ClassifierSpec, build_classifier
    from ray_med.models import load_base_model

    paths = {}
    for i, (name, labels) in enumerate((("triage", ["yes", "no", "maybe"]), ("urgency", ["low", "high"]))):
        torch.manual_seed(10 + i)
        spec = ClassifierSpec(num_labels=len(labels), labels=labels, pooling="mean",
                              downstream=AdapterConfig(method="lora", r=4, target_modules=["query", "value"]))
        model = build_classifier(load_base_model(str(minilm)), spec)
        randomise_lora(model, seed=20 + i)
        paths[name] = save_classifier(model, spec, out / name, str(minilm))
    return paths


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("serve_models")
    paths = build_lm(out)
    paths.update(build_classifiers(out, minilm_dir))
    (out / "manifest.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def make_png(width: int, height: int, *, claim: tuple[int, int] | None = None) -> bytes:
    """A real PNG of width x height; ``claim``: a header rewritten to say another size (a decompression bomb's trick)."""
    import numpy as np

    from ray_med.data.records import encode_png

    data = bytearray(encode_png(np.zeros((height, width), dtype=np.uint8)))
    if claim is not None:  # after the 8-byte signature: length, b"IHDR", width, height, ..., CRC of type + data
        data[16:24] = struct.pack(">II", *claim)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def png():
    """:func:`make_png`, for tests."""
    return make_png


def vlm_texts() -> list[str]:
    """Text shaped like the multimodal prompts and chats, so the tiny VLM's tokenizer has their words."""
    from ray_med.data.records import Record
    from ray_med.tasks import get_multimodal_task
    from ray_med.tasks.instructions import make_example

    texts = []
    for name, label in (("pneumonia", "normal"), ("pneumonia", "pneumonia")):
        ex = make_example(get_multimodal_task(name), Record(id="x", source="t", image=b"", label=label))
        texts.append(f"{ex.prompt} {ex.target}")
    texts += ["User: Describe the chest X-ray <image>\nAssistant: The lungs are clear. No pleural effusion.",
              "Given the chest X-ray <img>. Q: Is there a pleural effusion? A: no",
              "FINDINGS: Right lower lobe consolidation. IMPRESSION: Pneumonia."]
    return texts * 10


def build_tiny_vlm(out: Path) -> Path:
    """A tiny LLaVA folder (random init, tiny-vlm preset) with its tokenizer and processor."""
    from ray_med.models import train_bpe_tokenizer
    from ray_med.models.vlm import VLMConfig, add_image_token, build_vlm, save_vlm

    tok = train_bpe_tokenizer(vlm_texts(), vocab_size=400)
    add_image_token(tok)
    torch.manual_seed(0)
    return save_vlm(build_vlm(VLMConfig(preset="tiny-vlm"), tok), tok, out / "vlm")


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory) -> Path:
    """:func:`build_tiny_vlm`, once per session."""
    return build_tiny_vlm(tmp_path_factory.mktemp("serve_vlm"))
