"""How a language model is asked a task: QA prompts with few-shot exemplars, fitted to the context.

Two prompt styles (:data:`~ray_med.tasks.registry.PromptStyle`): multiple choice with
lettered options (MedQA, MedMCQA) and yes/no/maybe over an abstract (PubMedQA). A prompt
is an instruction, seeded few-shot exemplars that never include the item itself, the
question, and the answer cue of the inference mode: ``Answer:`` for top-token scoring,
``Answer: Let's think step by step.`` for chain of thought. :func:`fit_prompt` makes it
fit the model's context by dropping exemplars, then cutting the context, and raises
:class:`PromptTooLong` (HTTP 413 when serving) when the question alone does not fit.

The inference modes that consume these prompts are in :mod:`ray_med.evaluation.qa`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray_med.errors import DataError

MODES: tuple[str, ...] = ("top_token", "cot", "sc_cot")
"""The inference modes a prompt can be built for (``ray_med.evaluation.qa`` runs them)."""
PUBMEDQA_CHOICES: tuple[str, ...] = ("yes", "no", "maybe")
COT_TRIGGER = "Let's think step by step."

_MCQ_HEADER = "The following are multiple choice questions about medicine. Answer with the letter of the correct option."
_YESNO_HEADER = "Answer each biomedical research question about its abstract with yes, no or maybe."


@dataclass
class QAItem:
    """One question: multiple choice (``options`` by letter) or yes/no/maybe (no options)."""

    id: str
    question: str
    context: str | None = None
    options: dict[str, str] | None = None
    answer: str | None = None
    """Gold answer (a letter, or yes/no/maybe), when known."""
    rationale: str | None = None
    """An explanation, used when the item is a chain-of-thought exemplar."""

    @property
    def choices(self) -> list[str]:
        """What the model may answer: option letters, or yes/no/maybe."""
        return list(self.options) if self.options else list(PUBMEDQA_CHOICES)


def item_from_record(record: Any) -> QAItem:
    """A :class:`QAItem` from a reader's Record (MedQA, MedMCQA or PubMedQA)."""
    if not record.question:
        raise DataError(f"record {record.id} ({record.source}) has no question")
    meta = record.meta or {}
    rationale = meta.get("exp") or meta.get("explanation") or meta.get("long_answer") or None
    return QAItem(id=record.id, question=record.question, context=record.context, options=record.options,
                  answer=record.answer, rationale=rationale)


def select_shots(pool: Sequence[QAItem], k: int, seed: int, item: QAItem) -> list[QAItem]:
    """``k`` exemplars with gold answers, never the item itself, the same for the same seed."""
    if k <= 0:
        return []
    same_kind = [s for s in pool if s.answer and bool(s.options) == bool(item.options)
                 and s.id != item.id and s.question != item.question]
    # Seeded by the question and options, not the id: the server's items have no id, and
    # the same question must get the same exemplars offline and online.
    rng = random.Random(f"{seed}:{item.question}:{sorted((item.options or {}).items())}")
    return rng.sample(same_kind, min(k, len(same_kind)))


def _body(item: QAItem, context: str | None) -> str:
    lines = []
    if context:
        lines.append(f"Context: {context}")
    lines.append(f"Question: {item.question}")
    if item.options:
        lines.append("Options:")
        lines += [f"{k}. {v}" for k, v in item.options.items()]
    else:
        lines.append("Options: yes, no, maybe")
    return "\n".join(lines)


def _exemplar(item: QAItem, cot: bool) -> str:
    if cot and item.rationale:
        answer = f"{COT_TRIGGER} {item.rationale.strip()} Therefore, the answer is {item.answer}."
    else:
        answer = str(item.answer)
    return f"{_body(item, item.context)}\nAnswer: {answer}"


def build_prompt(item: QAItem, shots: Sequence[QAItem], mode: str, *, context: str | None = None) -> str:
    """The full prompt: instruction, exemplars, the question, and the answer cue.

    ``context`` overrides the item's context (to pass a truncated one).
    """
    if mode not in MODES:
        raise DataError(f"unknown QA mode {mode!r}; choose one of {', '.join(MODES)}")
    cot = mode != "top_token"
    parts = [_MCQ_HEADER if item.options else _YESNO_HEADER]
    parts += [_exemplar(s, cot) for s in shots]
    cue = f"Answer: {COT_TRIGGER}" if cot else "Answer:"
    parts.append(f"{_body(item, item.context if context is None else context)}\n{cue}")
    return "\n\n".join(parts)


class PromptTooLong(DataError):
    """A question that does not fit the model's context even with no exemplars and no context."""


def fit_prompt(tokenizer: Any, item: QAItem, shots: Sequence[QAItem], mode: str, max_tokens: int) -> list[int]:
    """Token ids of the prompt, dropping exemplars and then trimming the context to fit.

    Exemplars go first (last one first), then the context is cut from its end; a question
    and options that alone exceed ``max_tokens`` raise :class:`PromptTooLong`.
    """
    shots = list(shots)
    while True:
        ids = _ids(tokenizer, build_prompt(item, shots, mode))
        if len(ids) <= max_tokens:
            return ids
        if not shots:
            break
        shots.pop()
    if item.context:
        bare = len(_ids(tokenizer, build_prompt(item, [], mode, context="")))
        ctx = _ids(tokenizer, item.context, special=False)
        keep = max_tokens - bare - 2  # context tokens may merge differently at the seam
        while keep > 0:
            ids = _ids(tokenizer, build_prompt(item, [], mode, context=tokenizer.decode(ctx[:keep])))
            if len(ids) <= max_tokens:
                return ids
            keep -= max(1, len(ids) - max_tokens)
        ids = _ids(tokenizer, build_prompt(item, [], mode, context=""))
        if len(ids) <= max_tokens:
            return ids
    raise PromptTooLong(
        f"the question{' and options' if item.options else ''} alone take more than {max_tokens} tokens, "
        "the model's prompt limit"
    )


def _ids(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]
