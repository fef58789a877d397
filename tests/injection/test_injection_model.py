"""The injected model without Ray: config checks, prompts and answers, placeholder filling, save/load, fold-to-LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_med.adapters.m3oe import M3OE, M3OEConfig
from ray_med.config import load_config
from ray_med.errors import ConfigError
from ray_med.federated.models import EncoderSpec, build_model, save_modality
from ray_med.injection.config import InjectConfig
from ray_med.injection.model import (
    Encoder,
    InjectedModel,
    TaskSpec,
    add_placeholders,
    choice_probs,
    collate,
    fold_task,
    load_injected,
    prompt_text,
    save_injected,
)
from ray_med.models import build_model as build_lm
from ray_med.models import save_pretrained, train_bpe_tokenizer

PNEUMONIA = TaskSpec("pneumonia", "image", "Pneumonia detection from a chest X-ray", "Does it show pneumonia?",
                     {"pneumonia": "yes", "normal": "no"}, ["normal", "pneumonia"])
NORMAL = TaskSpec("normal_cxr", "image", "Screening for a normal chest radiograph", "Is it normal?",
                  {"normal": "yes", "pneumonia": "no"}, ["normal", "pneumonia"], seen=False)


def test_config_refuses_an_unseen_task_whose_text_was_trained_and_bad_methods() -> None:
    seen = {"name": "a", "modality": "image", "description": "Pneumonia detection", "question": "q?",
            "answers": {"pneumonia": "yes", "normal": "no"}}
    with pytest.raises(ConfigError, match="never appear in training"):
        load_config(InjectConfig, overrides=[f"tasks=[{_yaml(seen)}]",
                                             f"unseen=[{_yaml({**seen, 'name': 'b', 'description': ' pneumonia DETECTION'})}]"])
    with pytest.raises(ConfigError, match="method must be one of"):
        load_config(InjectConfig, overrides=["method=moe"])
    with pytest.raises(ConfigError, match="at least two answer words"):
        load_config(InjectConfig, overrides=[f"tasks=[{_yaml({**seen, 'answers': {'pneumonia': 'yes'}})}]"])
    with pytest.raises(ConfigError, match="adapter.method m3oe"):
        load_config(InjectConfig, overrides=["adapter.method=lora"])
    with pytest.raises(ConfigError, match="rounds_interleaved needs federated.config"):
        load_config(InjectConfig, overrides=["rounds_interleaved=true"])


def _yaml(d: dict) -> str:
    import json

    return json.dumps(d)


def test_answers_map_labels_to_option_indices() -> None:
    assert PNEUMONIA.options == ["no", "yes"]  # label order: normal first
    assert PNEUMONIA.gold(0) == 0 and PNEUMONIA.gold(1) == 1
    assert NORMAL.options == ["yes", "no"] and NORMAL.gold(0) == 0 and NORMAL.gold(1) == 1
    three = TaskSpec("u", "text", "d", "q", {"Urology": "yes", "Surgery": "no", "Bariatrics": "no"},
                     ["Bariatrics", "Surgery", "Urology"])
    assert three.options == ["no", "yes"] and [three.gold(i) for i in range(3)] == [0, 0, 1]
    with pytest.raises(ConfigError, match="no word for the labels"):
        TaskSpec("x", "image", "d", "q", {"pneumonia": "yes", "other": "no"}, ["normal", "pneumonia"]).check_labels()


def _parts(tmp_path, experts: int = 3):
    torch.manual_seed(0)
    texts = [prompt_text(PNEUMONIA, 1) + " yes", prompt_text(PNEUMONIA, 1) + " no", "Image only"] * 4
    tok = train_bpe_tokenizer(texts, vocab_size=400, min_frequency=1)
    ids = add_placeholders(tok, ["image"])
    llm = build_lm("tiny-llama", vocab_size=len(tok))
    save_pretrained(llm, tmp_path / "llm", tok)
    enc = build_model(EncoderSpec(modality="image", encoder="cnn", dim=16, tasks={"pneumonia": ["normal", "pneumonia"]}),
                      seed=0)
    save_modality(enc, tmp_path / "enc")
    model = InjectedModel(llm, {"image": enc}, ids, 2, {"image": "Image only"})
    m3oe = M3OE.inject(llm, M3OEConfig(experts=experts, r=2, alpha=4))
    with torch.no_grad():  # B starts at zero: make the experts matter
        for p in m3oe.trainable_parameters():
            p.normal_(0, 0.2)
    model.attach_m3oe(m3oe)
    return model.eval(), tok


def _saved(tmp_path):
    """The M3OE model of ``_parts`` saved as jobs/inject.py saves it: model/, adapter/, folded/<task>/."""
    model, tok = _parts(tmp_path)
    tasks = {"pneumonia": PNEUMONIA, "normal_cxr": NORMAL}
    save_injected(model, tmp_path / "model", llm_dir=tmp_path / "llm", encoder_dirs={"image": str(tmp_path / "enc")},
                  tasks=tasks, method="m3oe")
    model.m3oe.save(tmp_path / "adapter")
    for name in tasks:
        fold_task(model, tok, tasks[name], tmp_path / "folded" / name)
    return model, tasks


def test_placeholders_carry_the_projected_encoder_vector(tmp_path) -> None:
    model, tok = _parts(tmp_path)
    enc = Encoder(tok, {"pneumonia": PNEUMONIA}, model.modality_texts, model.n_tokens)
    x = np.random.default_rng(0).random((2, 3, 28, 28), dtype=np.float32)
    b = collate([enc.item("pneumonia", x[0], 1), enc.item("pneumonia", x[1], 0)], enc.pad)
    emb = model.embed(b["input_ids"], b["inputs"])
    where = b["input_ids"] == model.token_ids["image"]
    assert int(where.sum()) == 2 * model.n_tokens
    expected = model.projectors["image"](model.encoders["image"].embed(torch.from_numpy(x)))
    torch.testing.assert_close(emb[where].view(2, model.n_tokens, -1), expected)
    plain = model.llm.get_input_embeddings()(b["input_ids"])
    torch.testing.assert_close(emb[~where], plain[~where])  # every other position is the LLM's own embedding


def test_saved_model_folds_each_task_to_a_lora_with_the_same_answers(tmp_path) -> None:
    model, tasks = _saved(tmp_path)
    x = np.random.default_rng(1).random((5, 3, 28, 28), dtype=np.float32)
    live, tok2, loaded_tasks = load_injected(tmp_path / "model", tmp_path / "adapter")
    assert loaded_tasks["normal_cxr"].seen is False and loaded_tasks["pneumonia"].options == ["no", "yes"]
    for name, task in tasks.items():
        enc = Encoder(tok2, {name: task}, live.modality_texts, live.n_tokens)
        items = [enc.item(name, x[i], i % 2) for i in range(5)]
        p_live = choice_probs(live, items, enc.pad)
        folded, _, _ = load_injected(tmp_path / "model", tmp_path / "folded" / name)
        p_folded = choice_probs(folded, items, enc.pad)
        np.testing.assert_allclose(p_folded, p_live, atol=1e-5)
        # The in-memory model scores the same as its saved folder (nothing lost on save).
        np.testing.assert_allclose(choice_probs(model, items, enc.pad), p_live, atol=1e-5)
    # The two tasks' gates differ, so folding is per task (the same LoRA would not serve both).
    a = json_of(tmp_path / "folded" / "pneumonia" / "adapter_config.json")
    assert a["peft_type"] == "LORA" and a["r"] <= 3 * 2


def json_of(path):
    import json

    return json.loads(path.read_text())


def test_engine_live_gate_and_folded_lora_give_the_same_answers_and_clear_errors(tmp_path) -> None:
    import io

    from PIL import Image

    from ray_med.errors import DataError
    from ray_med.injection.engine import InjectedEngine

    model, tasks = _saved(tmp_path)
    live = InjectedEngine(str(tmp_path / "model"), str(tmp_path / "adapter"))
    folded = InjectedEngine(str(tmp_path / "model"), gate="folded", folded_dir=str(tmp_path / "folded"))
    rng = np.random.default_rng(0)
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
        for task in ("pneumonia", "normal_cxr"):
            a = live.classify(task, "image", image=buf.getvalue())
            b = folded.classify(task, image=buf.getvalue())
            assert a["label"] == b["label"] and (a["gate"], b["gate"]) == ("live", "folded")
            for word in a["probabilities"]:
                assert abs(a["probabilities"][word] - b["probabilities"][word]) < 1e-5
            assert live.generate(task, image=buf.getvalue(), max_new_tokens=4)["text"] == \
                folded.generate(task, image=buf.getvalue(), max_new_tokens=4)["text"]
    assert folded.host.loaded == ["pneumonia", "normal_cxr"]
    for kwargs, needle in [(dict(task_name="nope", image=b"x"), "unknown task"),
                           (dict(task_name="pneumonia", modality="text", text="a note"), "reads image inputs"),
                           (dict(task_name="pneumonia", features=[1.0]), "send image")]:
        with pytest.raises(DataError, match=needle):
            live.classify(**kwargs)
