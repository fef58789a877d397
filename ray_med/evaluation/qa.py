"""Medical QA inference modes, shared by ``jobs/evaluate.py qa`` and the Serve app.

Three modes, after Meditron's evaluation, with two of its flaws fixed:

* **top_token**: one forward pass over the prompt, then the log-probability of each
  option's first token at the last position; the answer is the best option. Meditron's
  code generated greedily and parsed the text, so a model that starts "The answer..."
  scored wrong even when it ranked the right option first.
* **cot**: the prompt ends with "Let's think step by step."; the model writes a
  rationale greedily and the answer is extracted from it.
* **sc_cot**: self-consistency: ``n`` rationales sampled at ``temperature``, each
  answer extracted, and a majority vote *over valid extractions only*. Meditron's code
  let failed extractions vote; here they are counted but do not vote, and the item
  abstains when none is valid.

Everything here is plain torch and transformers (no Ray), so the offline job and the
server call the same functions and give the same answers.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ray_med.errors import DataError

Mode = Literal["top_token", "cot", "sc_cot"]
MODES: tuple[str, ...] = ("top_token", "cot", "sc_cot")
FORMATS: tuple[str, ...] = ("medqa", "medmcqa", "pubmedqa")
PUBMEDQA_CHOICES: tuple[str, ...] = ("yes", "no", "maybe")
COT_TRIGGER = "Let's think step by step."

_MCQ_HEADER = "The following are multiple choice questions about medicine. Answer with the letter of the correct option."
_YESNO_HEADER = "Answer each biomedical research question about its abstract with yes, no or maybe."
# Where a generated rationale stops being an answer to *this* question: models trained
# on few-shot text go on to write the next "Question:".
_STOP = re.compile(r"\n\s*(?:Question|Context|Options)\s*:")


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


@dataclass
class QAConfig:
    """How questions are asked and answered."""

    mode: Mode = "top_token"
    """top_token, cot or sc_cot."""
    shots: int = 0
    """Few-shot exemplars before each question (drawn from the exemplar pool)."""
    seed: int = 0
    """Seed for exemplar choice and for sampling."""
    n: int = 5
    """Samples per question for sc_cot."""
    temperature: float = 0.8
    """Sampling temperature for sc_cot."""
    max_new_tokens: int = 128
    """Rationale length limit for cot and sc_cot."""
    max_prompt_tokens: int = 0
    """Prompt length limit; 0 means the model's context minus max_new_tokens (1 for top_token)."""


@dataclass
class QAResult:
    """The answer to one question, with what it was based on."""

    answer: str | None
    abstained: bool
    scores: dict[str, float] | None = None
    """top_token: probability of each choice (softmax over the choices' log-probs)."""
    logprobs: dict[str, float] | None = None
    """top_token: log-probability of each choice's token over the whole vocabulary."""
    votes: dict[str, int] | None = None
    """cot/sc_cot: valid extractions per choice."""
    invalid: int = 0
    """cot/sc_cot: samples whose answer could not be extracted."""
    rationale: str | None = None
    """cot: the rationale; sc_cot: the first rationale that agrees with the vote."""
    samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {"answer": self.answer, "abstained": self.abstained}
        for key in ("scores", "logprobs", "votes", "rationale"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.votes is not None:
            out["invalid"] = self.invalid
        return out


# --------------------------------------------------------------------------- prompts


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


def context_length(model: Any) -> int:
    """Tokens the model attends over (prompt + generated), from its config."""
    return int(getattr(model.config, "max_position_embeddings", 2048))


def prompt_limit(model: Any, cfg: QAConfig) -> int:
    """The prompt length limit for ``cfg`` on ``model``."""
    if cfg.max_prompt_tokens:
        return cfg.max_prompt_tokens
    return context_length(model) - (1 if cfg.mode == "top_token" else cfg.max_new_tokens)


# --------------------------------------------------------------------------- scoring


def choice_token_ids(tokenizer: Any, choices: Sequence[str]) -> list[int]:
    """For each choice, the token the model would write right after "Answer:"; they must all differ.

    Found by tokenizing "Answer: <choice>" and taking the first token past "Answer:", so
    SentencePiece tokenizers (Llama's "▁A") and byte-level BPE ("ĠA") both give the
    token that really follows the prompt. A choice that takes several tokens is scored
    by its first.
    """
    cue = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    ids = []
    for choice in choices:
        full = tokenizer(f"Answer: {choice}", add_special_tokens=False)["input_ids"]
        k = next((i for i, (a, b) in enumerate(zip(cue, full, strict=False)) if a != b), len(cue))
        if k >= len(full):
            raise DataError(f"option {choice!r} tokenizes to nothing")
        ids.append(full[k])
    if len(set(ids)) != len(ids):
        raise DataError(f"options {list(choices)} do not start with distinct tokens, so top_token cannot tell them apart")
    return ids


def top_token(model: Any, tokenizer: Any, prompts: Sequence[list[int]], choices: Sequence[Sequence[str]]) -> list[QAResult]:
    """Score a batch of prompts in one forward pass (right padding; last real position)."""
    if not prompts:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        # Right padding keeps every real token at its own position, so no position_ids
        # arithmetic is needed; causal attention never looks at the pads after it.
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = mask.sum(1).to(device) - 1
        logp = torch.log_softmax(logits[torch.arange(len(prompts), device=device), last].float(), dim=-1).cpu()
    out = []
    for row, opts in zip(logp, choices, strict=True):
        tok = torch.tensor(choice_token_ids(tokenizer, opts))
        lp = row[tok]
        probs = torch.softmax(lp, dim=0)
        best = int(torch.argmax(lp))
        out.append(QAResult(
            answer=opts[best], abstained=False,
            scores={c: round(float(p), 6) for c, p in zip(opts, probs, strict=True)},
            logprobs={c: round(float(v), 4) for c, v in zip(opts, lp, strict=True)},
        ))
    return out


def generate(
    model: Any, tokenizer: Any, prompt: list[int], *, n: int = 1, temperature: float = 0.0,
    max_new_tokens: int = 128, seed: int = 0,
) -> list[str]:
    """``n`` continuations of ``prompt``: greedy when ``temperature`` is 0, else sampled with ``seed``."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    sample = temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens, "num_return_sequences": n}
    if sample:
        kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        torch.manual_seed(seed)  # generate() has no generator argument; callers serialise model use
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, **kwargs)
    return tokenizer.batch_decode(out[:, len(prompt):], skip_special_tokens=True)


# --------------------------------------------------------------------------- extraction and voting


def extract_answer(text: str, choices: Sequence[str]) -> str | None:
    """The answer a rationale gives, or None when it gives none (or an invalid one).

    Looks, in order, for the first "the answer is X", then "Answer: X", then a rationale that is
    just the choice, in the part of the text before the model starts another question.
    """
    text = _own_answer(text)
    alt = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    if all(len(c) == 1 for c in choices):
        # A capital letter standing alone: "(B)", "B.", "**B**", "option B". Lower case is
        # left out on purpose: "the answer is a ..." is English, not option A.
        target = rf"(?:(?i:option|choice)\s+)?[*\"'(]*({alt})(?![A-Za-z])"
    else:
        target = rf"[*\"'(]*(?i:({alt}))\b"  # words in any case, maybe quoted
    for cue in (r"(?i:answer is)\s*:?\s*", r"(?i:answer)\s*:\s*"):
        found = re.findall(cue + target, text)
        if found:
            return _canonical(found[0], choices)  # its first commitment; what follows is rambling
    bare = text.strip().strip(".()").strip()
    return _canonical(bare, choices) if bare.lower() in {c.lower() for c in choices} else None


def _own_answer(text: str) -> str:
    """A generation cut where the model starts writing another question."""
    return _STOP.split(text, maxsplit=1)[0].strip()


def _canonical(found: str, choices: Sequence[str]) -> str | None:
    for c in choices:
        if c.lower() == found.lower():
            return c
    return None


def vote(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int], int]:
    """Majority over the valid answers: (answer or None, votes per answer, invalid count).

    Ties go to the tied answer that was sampled first, so the result depends only on the
    samples, in order. No valid answer means abstaining (None).
    """
    valid = [a for a in answers if a is not None]
    votes = dict(Counter(valid))
    if not votes:
        return None, {}, len(answers)
    top = max(votes.values())
    winner = next(a for a in valid if votes[a] == top)
    return winner, votes, len(answers) - len(valid)


def chain_of_thought(model: Any, tokenizer: Any, prompt: list[int], choices: Sequence[str], cfg: QAConfig) -> QAResult:
    """cot (one greedy rationale) or sc_cot (``cfg.n`` sampled rationales and a vote)."""
    if cfg.mode == "sc_cot" and cfg.temperature <= 0:
        raise DataError("sc_cot samples its rationales: temperature must be > 0 (use cot for greedy)")
    if cfg.mode == "cot":
        texts = generate(model, tokenizer, prompt, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    else:
        texts = generate(model, tokenizer, prompt, n=cfg.n, temperature=cfg.temperature,
                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    answers = [extract_answer(t, choices) for t in texts]
    winner, votes, invalid = vote(answers)
    rationale = next((_own_answer(t) for t, a in zip(texts, answers, strict=True) if a == winner),
                     _own_answer(texts[0]))
    return QAResult(answer=winner, abstained=winner is None, votes=votes, invalid=invalid,
                    rationale=rationale, samples=list(texts))


# --------------------------------------------------------------------------- whole sets


def answer_items(
    model: Any, tokenizer: Any, items: Sequence[QAItem], cfg: QAConfig, *,
    pool: Sequence[QAItem] = (), batch_size: int = 8,
) -> list[QAResult]:
    """Answer every item as ``cfg`` says; exemplars (``cfg.shots``) come from ``pool``."""
    limit = prompt_limit(model, cfg)
    prompts = [fit_prompt(tokenizer, it, select_shots(list(pool), cfg.shots, cfg.seed, it), cfg.mode, limit)
               for it in items]
    if cfg.mode == "top_token":
        out: list[QAResult] = []
        for i in range(0, len(items), batch_size):
            out += top_token(model, tokenizer, prompts[i : i + batch_size], [it.choices for it in items[i : i + batch_size]])
        return out
    return [chain_of_thought(model, tokenizer, p, it.choices, cfg) for p, it in zip(prompts, items, strict=True)]


def qa_metrics(items: Sequence[QAItem], results: Sequence[QAResult]) -> dict[str, Any]:
    """Accuracy over all items (abstentions count as wrong) and over answered items."""
    graded = [(it, r) for it, r in zip(items, results, strict=True) if it.answer is not None]
    correct = sum(r.answer == it.answer for it, r in graded)
    answered = [(it, r) for it, r in graded if not r.abstained]
    return {
        "n": len(graded),
        "accuracy": correct / len(graded) if graded else None,
        "accuracy_valid": (sum(r.answer == it.answer for it, r in answered) / len(answered)) if answered else None,
        "answered": len(answered),
        "abstentions": sum(r.abstained for _, r in graded),
        "invalid_samples": sum(r.invalid for _, r in graded),
    }
