"""QA: the task prompts and the inference modes (top-token scoring, answer extraction, voting). No Ray."""

from __future__ import annotations

import pytest
import torch

from ray_med.errors import DataError
from ray_med.evaluation.config import QAConfig
from ray_med.evaluation.qa import (
    QAResult,
    answer_items,
    choice_token_ids,
    extract_answer,
    qa_metrics,
    top_token,
    vote,
)
from ray_med.tasks import COT_TRIGGER, PromptTooLong, QAItem, build_prompt, fit_prompt, select_shots

MCQ = QAItem("q1", "Which enzyme is deficient in PKU?", options={"A": "Tyrosinase", "B": "PAH"}, answer="B",
             rationale="PKU is a PAH deficiency.")
YESNO = QAItem("q2", "Does aspirin prevent adenomas?", context="A randomised trial of aspirin.", answer="yes")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE trained on prompt-shaped text, so " A", " yes", ... are tokens."""
    from ray_med.models import train_bpe_tokenizer

    texts = [build_prompt(MCQ, [], "top_token") + " B", build_prompt(YESNO, [], "cot") + " the answer is yes",
             "Amoxicillin 500 mg three times daily for 5 days. Options: A, B, C, D, maybe no yes"]
    return train_bpe_tokenizer(texts * 30, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    from ray_med.models import build_model

    torch.manual_seed(0)
    return build_model("tiny-llama", vocab_size=len(tiny_tokenizer)).eval()


def test_prompt_formats():
    top = build_prompt(MCQ, [], "top_token")
    assert top.endswith("Question: Which enzyme is deficient in PKU?\nOptions:\nA. Tyrosinase\nB. PAH\nAnswer:")
    assert build_prompt(MCQ, [], "cot").endswith(f"Answer: {COT_TRIGGER}")
    yn = build_prompt(YESNO, [], "top_token")
    assert "Context: A randomised trial of aspirin.\nQuestion: Does aspirin" in yn and "yes, no or maybe" in yn
    shot = QAItem("s", "Is water wet?", options={"A": "Yes", "B": "No"}, answer="A", rationale="It is.")
    few = build_prompt(MCQ, [shot], "cot")
    assert f"Answer: {COT_TRIGGER} It is. Therefore, the answer is A.\n\n" in few
    assert "B. No\nAnswer: A\n\n" in build_prompt(MCQ, [shot], "top_token")
    with pytest.raises(DataError, match="unknown QA mode"):
        build_prompt(MCQ, [], "beam")


def test_shots_are_seeded_same_kind_and_never_the_item():
    pool = [QAItem(str(i), f"q{i}", options={"A": "a", "B": "b"}, answer="A") for i in range(10)] + [MCQ, YESNO]
    shots = select_shots(pool, 3, seed=1, item=MCQ)
    assert len(shots) == 3 and MCQ not in shots and YESNO not in shots
    assert shots == select_shots(pool, 3, seed=1, item=MCQ)
    assert select_shots(pool, 3, seed=2, item=MCQ) != shots
    assert select_shots(pool, 50, seed=1, item=MCQ) and len(select_shots(pool, 50, seed=1, item=MCQ)) == 10


def test_fit_prompt_drops_shots_then_trims_context(tiny_tokenizer):
    shot = QAItem("s", "Is water wet? " * 10, options={"A": "Yes", "B": "No"}, answer="A")
    full = len(fit_prompt(tiny_tokenizer, MCQ, [shot, shot], "top_token", 10_000))
    one = len(fit_prompt(tiny_tokenizer, MCQ, [shot], "top_token", 10_000))
    assert one < full
    assert len(fit_prompt(tiny_tokenizer, MCQ, [shot, shot], "top_token", one)) == one
    long_ctx = QAItem("c", "Does it work?", context="Amoxicillin 500 mg three times daily. " * 50)
    bare = len(fit_prompt(tiny_tokenizer, QAItem("c", "Does it work?"), [], "top_token", 10_000))
    ids = fit_prompt(tiny_tokenizer, long_ctx, [], "top_token", bare + 30)
    assert bare < len(ids) <= bare + 30
    assert tiny_tokenizer.decode(ids).endswith("Does it work?\nOptions: yes, no, maybe\nAnswer:")
    with pytest.raises(PromptTooLong, match="alone take more than 5 tokens"):
        fit_prompt(tiny_tokenizer, MCQ, [], "top_token", 5)


@pytest.mark.parametrize("text,choices,expected", [
    ("PAH is missing. Therefore, the answer is B.", "AB", "B"),
    ("the answer is (A)", "AB", "A"),
    ("Answer: B\nQuestion: next one... the answer is A", "AB", "B"),  # stops at the next question
    ("It could be A, but the answer is: B", "AB", "B"),
    ("B", "AB", "B"),
    ("so the answer is option B.", "AB", "B"),
    ("Answer: **A**", "AB", "A"),
    ("The answer is E.", "AB", None),  # not an option
    ("the answer is a mystery", "AB", None),  # a lower-case word is not the letter A
    ("no idea", "AB", None),
    ("So the answer is Yes.", ["yes", "no", "maybe"], "yes"),
    ("maybe", ["yes", "no", "maybe"], "maybe"),
    ('The answer is "No".', ["yes", "no", "maybe"], "no"),
    ("the answer is nothing", ["yes", "no", "maybe"], None),
])
def test_extract_answer(text, choices, expected):
    assert extract_answer(text, list(choices)) == expected


def test_vote_counts_valid_answers_only_and_abstains():
    # Meditron's code lets failed extractions vote: two Nones would beat one B here.
    assert vote([None, "B", None]) == ("B", {"B": 1}, 2)
    assert vote(["A", "B", "B", "A", "C"]) == ("A", {"A": 2, "B": 2, "C": 1}, 0)  # tie: the one sampled first
    assert vote(["B", "A", "A", "B"]) == ("B", {"B": 2, "A": 2}, 0)
    assert vote([None, None]) == (None, {}, 2)
    assert vote([]) == (None, {}, 0)


def test_choice_tokens_must_differ(tiny_tokenizer):
    a, b = choice_token_ids(tiny_tokenizer, ["A", "B"])
    assert a != b
    with pytest.raises(DataError, match="distinct tokens"):
        choice_token_ids(tiny_tokenizer, ["Amoxicillin", "Amoxicillin 500"])


def test_top_token_is_the_option_logprob_and_batching_does_not_change_it(lm, tiny_tokenizer):
    items = [MCQ, QAItem("q3", "Dose of paracetamol? " * 3, options={"A": "15 mg/kg", "B": "1 g/kg", "C": "none"})]
    prompts = [fit_prompt(tiny_tokenizer, it, [], "top_token", 500) for it in items]
    batched = top_token(lm, tiny_tokenizer, prompts, [it.choices for it in items])
    for p, it, res in zip(prompts, items, batched, strict=True):
        with torch.no_grad():
            logits = lm(torch.tensor([p])).logits[0, -1]
        logp = torch.log_softmax(logits, -1)
        expected = {c: float(logp[t]) for c, t in zip(it.choices, choice_token_ids(tiny_tokenizer, it.choices),
                                                          strict=True)}
        assert res.logprobs == pytest.approx(expected, abs=1e-3)
        assert res.answer == max(expected, key=expected.get)
        assert sum(res.scores.values()) == pytest.approx(1, abs=1e-5)


def test_cot_modes_end_to_end(lm, tiny_tokenizer):
    cfg = QAConfig(mode="sc_cot", n=4, max_new_tokens=8, seed=5)
    first = answer_items(lm, tiny_tokenizer, [MCQ, YESNO], cfg)
    again = answer_items(lm, tiny_tokenizer, [MCQ, YESNO], cfg)
    for a, b in zip(first, again, strict=True):
        assert a.samples == b.samples and len(a.samples) == 4  # seeded
        assert sum(a.votes.values()) + a.invalid == 4
        assert a.abstained == (a.answer is None)
    greedy = answer_items(lm, tiny_tokenizer, [MCQ], QAConfig(mode="cot", max_new_tokens=8))[0]
    assert len(greedy.samples) == 1


def test_qa_metrics_by_hand():
    items = [QAItem(str(i), "q", answer=a) for i, a in enumerate(["yes", "no", "maybe", "yes"])]
    results = [QAResult("yes", False), QAResult(None, True, votes={}, invalid=5), QAResult("maybe", False),
               QAResult("no", False)]
    m = qa_metrics(items, results)
    assert m["accuracy"] == 0.5 and m["accuracy_valid"] == pytest.approx(2 / 3)
    assert m["abstentions"] == 1 and m["answered"] == 3 and m["invalid_samples"] == 5 and m["n"] == 4


def test_choice_tokens_follow_the_cue_with_a_sentencepiece_tokenizer():
    """Llama-style Metaspace tokenizers write " A" as "▁A": the scored token is that one."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    texts = [build_prompt(MCQ, [], "top_token") + f" {c}" for c in "ABCDE"] * 20
    texts += [f"Answer: {w} the answer is {w}" for w in ("yes", "no", "maybe")] * 20
    sp.train_from_iterator(texts, vocab_size=300, min_frequency=2, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    ids = choice_token_ids(tok, list("ABCDE"))
    assert len(set(ids)) == 5
    assert [tok.convert_ids_to_tokens(i) for i in ids] == [f"▁{c}" for c in "ABCDE"]
    yn = choice_token_ids(tok, ["yes", "no", "maybe"])
    assert tok.convert_ids_to_tokens(yn[1]) == "▁no"


@pytest.mark.parametrize("mode", ["cot", "sc_cot"])
def test_batched_cot_answers_equal_one_at_a_time(lm, tiny_tokenizer, mode):
    """Every item and sample decoded in one loop gives what each item gets alone (sc_cot: same seeds)."""
    cfg = QAConfig(mode=mode, n=3, temperature=1.0, max_new_tokens=10, seed=11)
    items = [MCQ, YESNO, QAItem("q3", "Is PKU autosomal recessive?", answer="yes")]
    batched = answer_items(lm, tiny_tokenizer, items, cfg, decode_batch=64)
    sequential = answer_items(lm, tiny_tokenizer, items, cfg, decode_batch=1)
    per_item = [answer_items(lm, tiny_tokenizer, [it], cfg)[0] for it in items]
    for a, b, c in zip(batched, sequential, per_item, strict=True):
        assert a.samples == b.samples == c.samples and a.votes == b.votes == c.votes and a.answer == c.answer
    assert len(batched[0].samples) == (1 if mode == "cot" else 3)
