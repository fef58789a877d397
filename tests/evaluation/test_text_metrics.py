"""Generation metrics (BLEU, ROUGE-L, token F1, exact match) against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ray_med.errors import ConfigError, DataError
from ray_med.evaluation.text_metrics import (
    bleu,
    bleu1,
    exact_match,
    generation_metrics,
    mean_token_f1,
    normalize_answer,
    rouge_l,
    token_f1,
)

REPORTS = [
    "No acute cardiopulmonary process. Heart size is normal.",
    "Small left pleural effusion with adjacent atelectasis.",
]


def test_identical_texts_score_perfectly() -> None:
    assert bleu(REPORTS, REPORTS) == pytest.approx(100.0)
    assert bleu1(REPORTS, REPORTS) == pytest.approx(100.0)
    assert rouge_l(REPORTS, REPORTS) == pytest.approx(100.0)
    assert mean_token_f1(REPORTS, REPORTS) == pytest.approx(1.0)


def test_short_exact_answers_get_full_bleu4() -> None:
    # One-word answers have no 2-, 3- or 4-grams; effective order keeps BLEU-4 at 100, not 0.
    assert bleu(["yes", "no"], ["yes", "no"]) == pytest.approx(100.0)


def test_token_f1_hand_computed() -> None:
    # "the" is an article and goes: pred {left, lung}, ref {left, lower, lung}:
    # precision 2/2, recall 2/3, F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8.
    assert token_f1("the left lung", "left lower lung") == pytest.approx(0.8)
    # Bag of tokens: pred {lung: 2}, ref {lung: 1, nodule: 1}: overlap 1, P 1/2, R 1/2.
    assert token_f1("lung lung", "lung nodule") == pytest.approx(0.5)
    assert token_f1("Yes.", "yes") == 1.0
    assert token_f1("heart", "liver") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both empty once articles are dropped
    assert token_f1("", "effusion") == 0.0
    assert token_f1("effusion", "") == 0.0
    assert mean_token_f1(["the left lung", "heart"], ["left lower lung", "heart"]) == pytest.approx(0.9)


def test_exact_match_after_normalisation() -> None:
    assert normalize_answer("  The Left-Lung!  ") == "leftlung"
    assert exact_match("The right lung.", "right  LUNG") == 1.0
    assert exact_match("right lung", "left lung") == 0.0


def test_bleu1_hand_computed() -> None:
    # pred tokens: the the cat (3); ref: the cat sat on mat (5).
    # Clipped unigram matches: "the" once (the reference has one), "cat" once: 2 of 3.
    # Brevity penalty: exp(1 - 5/3).
    expected = 100 * (2 / 3) * math.exp(1 - 5 / 3)
    assert bleu1(["the the cat"], ["the cat sat on mat"]) == pytest.approx(expected)


def test_bleu_is_corpus_level() -> None:
    # Counts are pooled before dividing: 0 + 2 matches of 1 + 2 unigrams, lengths 3 vs 3 (no penalty).
    preds, refs = ["cat", "sat mat"], ["dog", "sat mat"]
    assert bleu1(preds, refs) == pytest.approx(100 * 2 / 3)


def test_rouge_l_known_lcs() -> None:
    # LCS of "the cat on mat" and "the cat sat on the mat" is the whole prediction (4 tokens):
    # P = 4/4, R = 4/6, F = 2 * 1 * (2/3) / (1 + 2/3) = 0.8.
    assert rouge_l(["the cat on mat"], ["the cat sat on the mat"]) == pytest.approx(80.0)
    # Mean over items: 80 and 100.
    assert rouge_l(["the cat on mat", "a b"], ["the cat sat on the mat", "a b"]) == pytest.approx(90.0)
    # Stemming: "effusions" matches "effusion".
    assert rouge_l(["pleural effusions"], ["pleural effusion"]) == pytest.approx(100.0)


def test_generation_metrics_vqa_keys_and_closed_accuracy() -> None:
    preds = ["Yes, there is one.", "no", "left lung", "right lobe"]
    refs = ["yes", "yes", "left lung", "left lower lung"]
    out = generation_metrics(preds, refs, "vqa")
    assert set(out) == {"bleu1", "token_f1", "exact_match", "closed_accuracy", "n"}
    assert out["n"] == 4
    assert out["exact_match"] == pytest.approx(1 / 4)
    assert out["closed_accuracy"] == pytest.approx(1 / 2)  # two closed items; the first answers "yes"
    # F1 per item: "yes there is one" vs "yes" -> P 1/4, R 1 -> 0.4; 0; 1; "right lobe" vs ref -> 0.
    assert out["token_f1"] == pytest.approx((0.4 + 0 + 1 + 0) / 4)
    assert 0 <= out["bleu1"] <= 100


def test_generation_metrics_vqa_without_closed_questions() -> None:
    out = generation_metrics(["left lung"], ["left lung"], "vqa")
    assert "closed_accuracy" not in out
    assert out["exact_match"] == 1.0 and out["token_f1"] == 1.0


def test_generation_metrics_report_keys() -> None:
    out = generation_metrics(REPORTS, REPORTS, "report")
    assert set(out) == {"bleu", "bleu1", "rouge_l", "n"}
    assert out["bleu"] == pytest.approx(100.0) and out["rouge_l"] == pytest.approx(100.0)
    assert out["n"] == 2


def test_errors() -> None:
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        generation_metrics(["a", "b"], ["a"], "vqa")
    with pytest.raises(DataError, match="empty"):
        generation_metrics([], [], "report")
    with pytest.raises(DataError, match="1 predictions but 0 references"):
        bleu(["a"], [])
    with pytest.raises(DataError):
        rouge_l(["a"], ["a", "b"])
    with pytest.raises(DataError):
        mean_token_f1([], [])
    with pytest.raises(DataError, match="single string"):
        bleu("a cat", "a cat")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'vqa' or 'report'"):
        generation_metrics(["a"], ["a"], "summary")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_order"):
        bleu(["a"], ["a"], max_order=0)
