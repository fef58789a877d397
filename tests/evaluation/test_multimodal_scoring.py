"""Running the multimodal model on examples: batching, pixels, scoring and training steps (no Ray)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ray_med.data.records import Record, encode_png
from ray_med.data.task_mixture import MixtureSettings
from ray_med.errors import ConfigError
from ray_med.evaluation.multimodal import ModelGeometry, Pixels, choice_probs, collate, prepare
from ray_med.models import train_bpe_tokenizer
from ray_med.models.vlm import VLMConfig, add_image_token, build_vlm, set_phase
from ray_med.tasks import get_multimodal_task
from ray_med.tasks.instructions import answer_ids, make_example
from ray_med.training.multimodal_config import MultimodalConfig, MultimodalTrainSettings
from ray_med.training.vlm import split_dev, train_vlm

TEXTS = ["Given the chest X-ray <img>. Q: Which finding does the X-ray show? (A) normal (B) pneumonia A: B",
         "Context: an abstract. Q: Is it so? (yes, no, maybe) A: yes"] * 20


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Any, ModelGeometry]:
    tok = train_bpe_tokenizer(TEXTS, vocab_size=320)
    add_image_token(tok)
    torch.manual_seed(0)
    model = build_vlm(VLMConfig(), tok).eval()
    return tok, model, ModelGeometry.of(model.config)


def _xray(seed: int) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8))


def _items(tok: Any, geo: ModelGeometry) -> list[Any]:
    pneu = get_multimodal_task("pneumonia")
    qa = get_multimodal_task("pubmedqa")
    exs = [make_example(pneu, Record(id="train-0", source="m", image=_xray(1), label="normal")),
           make_example(qa, Record(id="q1", source="p", question="Is it so?", context="An abstract.", answer="no")),
           make_example(pneu, Record(id="train-0", source="m", image=_xray(2), label="pneumonia"))]  # same id!
    return [prepare(tok, e, geo, 160) for e in exs]


def test_a_mixed_batch_scores_each_item_as_alone_and_ids_never_share_pixels(setup) -> None:
    tok, model, geo = setup
    items = _items(tok, geo)
    pixels = Pixels(geo.spec)
    pad = tok.pad_token_id
    # the two X-rays share task and id but not pixels: the memo is keyed by content
    assert not torch.equal(pixels(items[0].image), pixels(items[2].image))
    b = collate(items, pixels, pad)
    assert b["pixel_values"].shape[0] == 2  # the text item brings no image
    with torch.no_grad():
        together = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         pixel_values=b["pixel_values"]).logits
        for i, p in enumerate(items):
            one = collate([p], pixels, pad)
            alone = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                          pixel_values=one["pixel_values"]).logits
            n = len(p.input_ids)
            torch.testing.assert_close(together[i, :n], alone[0, :n], rtol=1e-4, atol=1e-5)
    image_items = [items[0], items[2]]
    batched = choice_probs(model, image_items, pixels, pad)
    singles = np.concatenate([choice_probs(model, [p], pixels, pad) for p in image_items])
    np.testing.assert_allclose(batched, singles, rtol=1e-5, atol=1e-6)
    assert np.allclose(batched.sum(1), 1.0)


def test_the_trained_answer_token_is_the_scored_token_for_sentencepiece_style_tokenizers() -> None:
    class LegacySentencePiece:  # Llama-2's legacy normaliser: a lone " B" is ["▁", "▁B"]
        vocab = {"▁": 1, "▁A": 2, ":": 3, "▁B": 4}

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            pieces = ("▁" + text.replace(" ", "▁")).replace("▁▁", "▁ ▁").replace(":", " : ").split()
            return {"input_ids": [self.vocab[p] for p in pieces]}

    tok = LegacySentencePiece()
    assert tok(" B")["input_ids"] == [1, 4]  # what tokenizing the target alone would train
    assert answer_ids(tok, "B") == [4]  # what the model writes after "A:", the token choice scoring reads


def test_phase_projector_steps_on_a_batch_without_images(setup) -> None:
    tok, _, geo = setup
    model = set_phase(build_vlm(VLMConfig(), tok), "projector")
    qa = get_multimodal_task("pubmedqa")
    ex = [make_example(qa, Record(id=f"q{i}", source="p", question="Is it so?", context="x", answer="yes"))
          for i in range(8)]
    items = {"pubmedqa": [prepare(tok, e, geo, 160) for e in ex]}
    before = model.model.multi_modal_projector.linear_1.weight.detach().clone()
    out = train_vlm(model, items, items, MultimodalTrainSettings(batch_size=4, max_steps=2, warmup_steps=1,
                                                                 keep_best=False), MixtureSettings(),
                    pixels=Pixels(geo.spec), pad_id=tok.pad_token_id)
    assert out["steps"] == 2 and out["monitor"] == "dev_auroc"
    assert torch.equal(before, model.model.multi_modal_projector.linear_1.weight)  # zero gradients, no change


def test_dev_is_capped_and_what_it_leaves_stays_in_training() -> None:
    labels = [0] * 90 + [1] * 10
    train, dev = split_dev(list(range(100)), labels, 0.5, seed=0, max_items=20)
    assert len(dev) == 20 and len(train) == 80 and not set(train) & set(dev)
    assert sum(labels[i] for i in dev) == 2  # stratified


def test_held_out_files_must_not_overlap_what_is_trained_on() -> None:
    from ray_med.config import from_dict

    base = {"tasks": [{"task": "pneumonia", "path": "p.npz"}]}
    with pytest.raises(ConfigError, match=r"scores p.npz splits \['train'\], which tasks trains on"):
        from_dict(MultimodalConfig, {**base, "eval": [{"task": "pneumonia", "path": "p.npz",
                                                        "options": {"splits": ["train"]}}]})
    with pytest.raises(ConfigError, match="each task once"):
        from_dict(MultimodalConfig, {**base, "eval": [{"task": "pneumonia", "path": "p.npz"}] * 2})
    with pytest.raises(ConfigError, match="upsample applies to proportional ratios"):
        from_dict(MultimodalConfig, {"tasks": [{"task": "pneumonia", "path": "p.npz", "ratio": 1.0, "upsample": 2}]})
    ok = from_dict(MultimodalConfig, {**base, "eval": [{"task": "pneumonia", "path": "p.npz"}]})  # train vs val
    assert ok.eval[0].options is None
