"""Instruction prompts of the multimodal model: the exact text and token layout, and what is refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ray_med.data.records import Record, encode_png
from ray_med.errors import ConfigError, DataError
from ray_med.models import train_bpe_tokenizer
from ray_med.models.vlm import EXEMPLAR_IMAGE, IMAGE_TOKEN, add_image_token
from ray_med.tasks import get_multimodal_task, multimodal_tasks
from ray_med.tasks.instructions import Example, encode_example, make_example

N = 16  # image tokens of tiny-vlm
PNG = encode_png(np.zeros((4, 4), np.uint8))


@pytest.fixture(scope="module")
def tok() -> Any:
    t = train_bpe_tokenizer(["Given the chest X-ray <img>. Q: Which finding does the X-ray show? (A) normal "
                             "(B) pneumonia A: B Instructions: You are a helpful radiology assistant."] * 30,
                            vocab_size=320)
    add_image_token(t)
    return t


def test_pneumonia_prompt_text_is_medpalm_m_layout() -> None:
    ex = make_example(get_multimodal_task("pneumonia"), Record(id="7", source="m", image=PNG, label="pneumonia"))
    assert ex.prompt == (
        "Instructions: You are a helpful radiology assistant. Identify whether the chest X-ray shows pneumonia.\n"
        "Given the chest X-ray <img>. Q: Which finding does the X-ray show? (A) normal (B) pneumonia A: A\n"
        "Given the chest X-ray <image>. Q: Which finding does the X-ray show? (A) normal (B) pneumonia A:"
    )
    assert (ex.target, ex.choices, ex.gold, ex.image) == ("B", ["A", "B"], 1, PNG)


def test_token_layout_has_n_image_tokens_in_place_and_the_exemplar_as_text(tok: Any) -> None:
    ex = make_example(get_multimodal_task("pneumonia"), Record(id="7", source="m", image=PNG, label="normal"))
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode_example(tok, ex, image_token_id=img, n_image_tokens=N, max_length=512)
    before, after = ex.prompt.split(IMAGE_TOKEN)
    expected_prompt = ([tok.bos_token_id] + tok(before, add_special_tokens=False)["input_ids"] + [img] * N
                       + tok(after, add_special_tokens=False)["input_ids"])
    target = tok(" A", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids == expected_prompt + target
    assert enc.labels == [-100] * len(expected_prompt) + target
    assert enc.prompt_len == len(expected_prompt) and enc.has_image
    # exactly N image tokens, one contiguous run; the exemplar's <img> is ordinary text
    positions = [i for i, t in enumerate(enc.input_ids) if t == img]
    assert len(positions) == N and positions == list(range(positions[0], positions[0] + N))
    exemplar_ids = tok(EXEMPLAR_IMAGE, add_special_tokens=False)["input_ids"]
    assert img not in exemplar_ids
    assert tok.decode(enc.input_ids[: positions[0]]).count(EXEMPLAR_IMAGE) == 1


def test_text_tasks_have_no_image_tokens(tok: Any) -> None:
    rec = Record(id="q", source="p", question="Is it?", context="Some abstract.", answer="maybe")
    ex = make_example(get_multimodal_task("pubmedqa"), rec)
    assert ex.image is None and ex.choices == ["yes", "no", "maybe"] and ex.gold == 2
    assert ex.prompt.endswith("Context: Some abstract. Q: Is it? (yes, no, maybe) A:")
    enc = encode_example(tok, ex, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), n_image_tokens=N,
                         max_length=512)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) not in enc.input_ids


def test_more_image_markers_than_images_is_refused(tok: Any) -> None:
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    two = Example(id="r", prompt=f"{IMAGE_TOKEN} and {IMAGE_TOKEN} Q: same? A:", target="", image=PNG, task="request")
    with pytest.raises(DataError, match=r"2 <image> marker\(s\) but 1 image"):
        encode_example(tok, two, image_token_id=img, n_image_tokens=N, max_length=512, with_target=False)
    none = Example(id="r", prompt=f"{IMAGE_TOKEN} Q: what? A:", target="", image=None, task="request")
    with pytest.raises(DataError, match=r"1 <image> marker\(s\) but 0 image"):
        encode_example(tok, none, image_token_id=img, n_image_tokens=N, max_length=512, with_target=False)


def test_a_long_context_is_cut_but_never_the_image_or_the_answer_cue(tok: Any) -> None:
    rec = Record(id="v", source="v", question="Is there an effusion?", answer="no", image=PNG,
                 context="word " * 400)
    task = get_multimodal_task("vqa_rad")
    ex = make_example(task, rec)
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode_example(tok, ex, image_token_id=img, n_image_tokens=N, max_length=96)
    assert len(enc.input_ids) <= 96 and enc.input_ids.count(img) == N
    assert tok.decode(enc.input_ids[: enc.prompt_len]).endswith("A:")


def test_bad_items_and_unknown_tasks_are_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'pneumonia'.*Valid multimodal tasks: .*cxr_report"):
        get_multimodal_task("pneumona")
    with pytest.raises(DataError, match="has no image"):
        make_example(get_multimodal_task("pneumonia"), Record(id="1", source="m", label="normal"))
    with pytest.raises(DataError, match="not one of"):
        make_example(get_multimodal_task("pneumonia"), Record(id="1", source="m", image=PNG, label="covid"))
    assert {"pneumonia", "pubmedqa", "medqa", "medmcqa", "vqa_rad", "slake", "cxr_report"} <= set(multimodal_tasks())


def test_every_task_builds_from_its_fixture() -> None:
    from pathlib import Path

    from ray_med.data import read_records

    fx = Path(__file__).resolve().parents[1] / "fixtures"
    for name, path in [("medqa", "medqa.jsonl"), ("medmcqa", "medmcqa.jsonl"), ("vqa_rad", "vqa_rad/vqa_rad.json"),
                       ("slake", "slake/slake.json"), ("cxr_report", "mimic_cxr/reports.json")]:
        task = get_multimodal_task(name)
        records = read_records(task.reader, str(fx / path)).records
        examples = [make_example(task, r) for r in records]
        assert any(e.target for e in examples)
        assert examples and all(e.prompt.count(IMAGE_TOKEN) == (1 if task.instruction.image else 0)
                                for e in examples)
        assert all(EXEMPLAR_IMAGE in e.prompt for e in examples) == task.instruction.image
