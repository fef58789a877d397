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

Rationales are decoded by :class:`ray_med.generation.decoder.BatchDecoder`, many items
and samples at once, with the seeding rule of :func:`cot_requests`.

The prompts themselves (instruction, exemplars, answer cue, fitting to the context) are
the task's: :mod:`ray_med.tasks.prompts`. Everything here is plain torch and
transformers (no Ray), so the offline job and the server call the same functions and
give the same answers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ray_med.errors import DataError
from ray_med.evaluation.config import QAConfig
from ray_med.generation.decoder import BatchDecoder, GenRequest, sample_seed
from ray_med.tasks.prompts import QAItem, fit_prompt, select_shots

Mode = Literal["top_token", "cot", "sc_cot"]
# Where a generated rationale stops being an answer to *this* question: models trained
# on few-shot text go on to write the next "Question:".
_STOP = re.compile(r"\n\s*(?:Question|Context|Options)\s*:")



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


# --------------------------------------------------------------------------- prompt limits


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


# Where a rationale may stop: the model has started another question (``_STOP``'s usual
# forms). Generation ends there; the answer was extracted from the text before it anyway.
STOP_STRINGS = ("\nQuestion:", "\nContext:", "\nOptions:")


def cot_requests(prompt: list[int], cfg: QAConfig, *, seed: int | None = None,
                 adapter: str | None = None) -> list[GenRequest]:
    """The sequences cot (one greedy) or sc_cot (``cfg.n`` sampled) decodes for one prompt.

    Sample ``j`` draws from its own generator seeded ``sample_seed(seed, j)`` (``seed``:
    ``cfg.seed`` when None), so a seeded item gets the same rationales alone, in any
    batch, offline or served.
    """
    if cfg.mode == "sc_cot" and cfg.temperature <= 0:
        raise DataError("sc_cot samples its rationales: temperature must be > 0 (use cot for greedy)")
    s = cfg.seed if seed is None else seed
    if cfg.mode == "cot":
        return [GenRequest(prompt, cfg.max_new_tokens, adapter=adapter, stop=STOP_STRINGS)]
    return [GenRequest(prompt, cfg.max_new_tokens, temperature=cfg.temperature, seed=sample_seed(s, j),
                       adapter=adapter, stop=STOP_STRINGS) for j in range(cfg.n)]


def cot_result(texts: Sequence[str], choices: Sequence[str]) -> QAResult:
    """The answer of cot / sc_cot rationales: each extracted, then the vote over the valid ones."""
    answers = [extract_answer(t, choices) for t in texts]
    winner, votes, invalid = vote(answers)
    rationale = next((_own_answer(t) for t, a in zip(texts, answers, strict=True) if a == winner),
                     _own_answer(texts[0]))
    return QAResult(answer=winner, abstained=winner is None, votes=votes, invalid=invalid,
                    rationale=rationale, samples=list(texts))


def chain_of_thought(model: Any, tokenizer: Any, prompt: list[int], choices: Sequence[str], cfg: QAConfig,
                     ) -> QAResult:
    """cot (one greedy rationale) or sc_cot (``cfg.n`` sampled rationales and a vote) of one prompt."""
    seqs = BatchDecoder(model, tokenizer, max_batch=max(cfg.n, 1)).run(cot_requests(prompt, cfg))
    return cot_result([s.text for s in seqs], choices)


# --------------------------------------------------------------------------- whole sets


def answer_items(
    model: Any, tokenizer: Any, items: Sequence[QAItem], cfg: QAConfig, *,
    pool: Sequence[QAItem] = (), batch_size: int = 8, decode_batch: int = 64,
) -> list[QAResult]:
    """Answer every item as ``cfg`` says; exemplars (``cfg.shots``) come from ``pool``.

    top_token scores ``batch_size`` prompts per forward pass. cot and sc_cot decode every
    item's rationales (all ``n`` samples of each) in one :class:`BatchDecoder` of up to
    ``decode_batch`` sequences, the loop the server generates with: the answers are the
    ones each item gets alone (the same seeds, greedy independent of the batch).
    """
    limit = prompt_limit(model, cfg)
    prompts = [fit_prompt(tokenizer, it, select_shots(list(pool), cfg.shots, cfg.seed, it), cfg.mode, limit)
               for it in items]
    if cfg.mode == "top_token":
        out: list[QAResult] = []
        for i in range(0, len(items), batch_size):
            out += top_token(model, tokenizer, prompts[i : i + batch_size], [it.choices for it in items[i : i + batch_size]])
        return out
    per_item = [cot_requests(p, cfg) for p in prompts]
    seqs = BatchDecoder(model, tokenizer, max_batch=decode_batch).run([r for reqs in per_item for r in reqs])
    results, k = [], 0
    for it, reqs in zip(items, per_item, strict=True):
        results.append(cot_result([s.text for s in seqs[k : k + len(reqs)]], it.choices))
        k += len(reqs)
    return results


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
