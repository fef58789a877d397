"""Generation metrics of MultiMedBench (Med-PaLM M, arXiv 2307.14334): BLEU, ROUGE-L, token F1, exact match.

Med-PaLM M scores its generative tasks with text overlap:

* **VQA** (VQA-RAD, Slake-VQA, Path-VQA): BLEU-1 and token F1; we add exact match and,
  for the closed (yes/no) questions, accuracy;
* **report generation and summarisation** (MIMIC-CXR reports, MIMIC-III radiology
  findings to impression): ROUGE-L and BLEU(-4), with BLEU-1 alongside.

BLEU and ROUGE-L come from their maintained libraries (``sacrebleu``, Google's
``rouge-score``), never from hand-written n-gram code, so our numbers are comparable with
papers that use them. Scales follow the libraries and the usual convention:

* BLEU, BLEU-1 and ROUGE-L are on **0-100**;
* token F1, exact match and closed accuracy are on **0-1**.

Tokenisation differs per metric, as in the references:

* BLEU uses sacrebleu's default ``13a`` tokeniser (mteval-v13a: punctuation split off,
  case kept) and corpus-level statistics: n-gram counts are summed over all items before
  the precisions and the brevity penalty are taken, which is not the mean of
  sentence BLEUs;
* ROUGE-L uses rouge-score's tokeniser (lowercase, non-alphanumerics dropped) with the
  Porter stemmer, and is the mean of per-item F-measures;
* token F1 and exact match use SQuAD's normalisation (lowercase, punctuation and the
  articles a/an/the removed, whitespace tokens).

``sacrebleu`` and ``rouge-score`` are imported when first used: rouge-score pulls in
NLTK (over a second to import), and neither is needed by the jobs that never generate.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from ray_med.errors import ConfigError, DataError

GenerationKind = Literal["vqa", "report"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_CLOSED = ("yes", "no")


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise DataError("predictions and references must be sequences of strings, not a single string")
    if len(predictions) != len(references):
        raise DataError(
            f"got {len(predictions)} predictions but {len(references)} references; "
            "they must pair up one to one"
        )
    if not predictions:
        raise DataError("no predictions to score: predictions and references are empty")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def bleu(predictions: Sequence[str], references: Sequence[str], *, max_order: int = 4) -> float:
    """Corpus BLEU (0-100) of ``predictions`` against one reference each, from sacrebleu.

    sacrebleu's defaults otherwise: ``13a`` tokenisation, case-sensitive, ``exp``
    smoothing. ``effective_order=True`` drops the n-gram orders that no prediction is
    long enough to have: VQA answers are often one or two words, and without it their
    missing 3- and 4-grams would make BLEU 0 even for exact answers. On report-length
    text every order has n-grams and the flag changes nothing.
    """
    _check_pairs(predictions, references)
    if max_order < 1:
        raise ConfigError(f"BLEU needs max_order >= 1, got {max_order}")
    from sacrebleu.metrics import BLEU  # lazy: only generative evaluation needs sacrebleu

    metric = BLEU(max_ngram_order=max_order, effective_order=True)
    return float(metric.corpus_score(list(predictions), [list(references)]).score)


def bleu1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-1 (0-100): clipped unigram precision times the brevity penalty."""
    return bleu(predictions, references, max_order=1)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0-100) over items, rouge-score with the Porter stemmer."""
    _check_pairs(predictions, references)
    from rouge_score import rouge_scorer  # lazy: rouge-score imports NLTK, over a second

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # score(target, prediction): the reference comes first.
    pairs = zip(predictions, references, strict=True)
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs)
    return 100.0 * total / len(predictions)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 (0-1) of the normalised bags of tokens.

    Both empty after normalisation: 1.0 (nothing to say, nothing said); one empty: 0.0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean token F1 (0-1) over items."""
    _check_pairs(predictions, references)
    return sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the answers are equal after SQuAD normalisation, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _closed_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Accuracy (0-1) on the items whose reference is yes/no; None when there are none.

    A prediction counts by its first normalised word, so "Yes, a small effusion" answers
    "yes": generative models rarely stop at the bare word, and BLEU-1 and token F1 already
    punish the extra words.
    """
    hits = []
    for pred, ref in zip(predictions, references, strict=True):
        ref_n = normalize_answer(ref)
        if ref_n in _CLOSED:
            words = normalize_answer(pred).split()
            hits.append(float(bool(words) and words[0] == ref_n))
    return sum(hits) / len(hits) if hits else None


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], kind: GenerationKind
) -> dict[str, float]:
    """The MultiMedBench metrics of one generative task.

    ``kind="vqa"``: ``bleu1`` (0-100), ``token_f1`` (0-1, mean), ``exact_match`` (0-1,
    mean), ``closed_accuracy`` (0-1, only present when some references are yes/no) and
    ``n``. ``kind="report"``: ``bleu`` (BLEU-4, 0-100), ``bleu1`` (0-100), ``rouge_l``
    (0-100, mean F-measure) and ``n``.
    """
    _check_pairs(predictions, references)
    out: dict[str, float] = {}
    if kind == "vqa":
        out["bleu1"] = bleu1(predictions, references)
        out["token_f1"] = mean_token_f1(predictions, references)
        matches = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True))
        out["exact_match"] = matches / len(predictions)
        closed = _closed_accuracy(predictions, references)
        if closed is not None:
            out["closed_accuracy"] = closed
    elif kind == "report":
        out["bleu"] = bleu(predictions, references)
        out["bleu1"] = bleu1(predictions, references)
        out["rouge_l"] = rouge_l(predictions, references)
    else:
        raise ConfigError(f"unknown generation metrics kind {kind!r}; expected 'vqa' or 'report'")
    out["n"] = len(predictions)
    return out
