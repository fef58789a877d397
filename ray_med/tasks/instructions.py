"""Instruction prompts for the multimodal model (Med-PaLM M): what a task asks, and the exact tokens it becomes.

Med-PaLM M (arXiv 2307.14334, section 4.2) asks every task the same way: an
instruction, then a text-only one-shot exemplar whose image is replaced by the literal
text ``<img>``, then the item's context with its image, and ``Q: ... A:``.
Classification is multiple choice with the class names as lettered options, so a
probability for every class is read from the next-token distribution over the letters.

:class:`Instruction` is the prompt part of a registered task (``Task.instruction``);
:func:`make_example` turns a reader's record into an :class:`Example` (prompt text,
target, choices, image); :func:`encode_example` tokenizes it with the ``<image>``
placeholder expanded to the model's N image tokens and the loss on the target only.
The layout, with ``|`` between pieces::

    Instructions: <instruction>\\n
    <exemplar context, with the text <img>> Q: <question> (A) .. (B) .. A: <answer>\\n
    <item context, with <image>> Q: <question> (A) .. (B) .. A:| <target><eos>
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ray_med.errors import DataError
from ray_med.models.vlm import EXEMPLAR_IMAGE, IMAGE_TOKEN

if TYPE_CHECKING:
    from ray_med.data.records import Record
    from ray_med.tasks.registry import Task

Kind = Literal["choice", "generate"]
"""choice: the answer is one of a few options (scored by top token); generate: free text (BLEU, ROUGE, F1)."""
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Exemplar:
    """A text-only one-shot example: no pixels; its image is the literal text ``<img>``."""

    question: str
    answer: str
    """A class name or option text for choice tasks (lettered when shown), the text for generation."""
    context: str = ""
    options: tuple[str, ...] | None = None
    """The exemplar's own options (MCQ); None: the task's."""


@dataclass(frozen=True)
class Instruction:
    """How the multimodal model is asked a task."""

    kind: Kind
    instruction: str
    context: str = "{context}"
    """Template of the item's context: ``{image}`` (the image, or ``<img>`` in the exemplar), ``{context}``."""
    question: str | None = None
    """A fixed question (image classification); None: the record's question."""
    options: Literal["labels", "record", "words"] | None = None
    """choice tasks: the task's class names lettered (labels), the record's lettered options (record), or
    the class names as words (yes/no/maybe)."""
    exemplar: Exemplar | None = None
    image: bool = False
    """The task has an image per item."""
    metric: Literal["classification", "vqa", "report"] = "classification"
    """How ``evaluate.py multimodal`` scores it."""


@dataclass
class Example:
    """One item as the model sees it."""

    id: str
    prompt: str
    """The text up to the answer cue, with one ``<image>`` where the image goes (image tasks)."""
    target: str
    """The answer text the model is trained to produce (a letter, a word, or a report)."""
    choices: list[str] | None = None
    """What top-token scoring compares (letters or words); None for generation."""
    gold: int | None = None
    """Index of the correct choice."""
    image: bytes | None = None
    """The item's image (PNG bytes), for image tasks."""
    task: str = ""


def _options_text(options: Sequence[str], lettered: bool) -> str:
    if not lettered:
        return " (" + ", ".join(options) + ")"
    return "".join(f" ({LETTERS[i]}) {o}" for i, o in enumerate(options))


def _turn(ins: Instruction, context: str, image: str, question: str, options: Sequence[str] | None,
          lettered: bool) -> str:
    ctx = ins.context.format(image=image, context=context).strip()
    opts = _options_text(options, lettered) if options else ""
    return f"{ctx} Q: {question}{opts} A:".strip()


def _choices(task: Task, record: Record) -> tuple[list[str], list[str], bool]:
    """(option texts shown, choice tokens scored, lettered) of a choice task's item."""
    ins = task.instruction
    assert ins is not None
    if ins.options == "record":
        if not record.options:
            raise DataError(f"{task.name}: record {record.id} has no options")
        keys = list(record.options)
        return [record.options[k] for k in keys], keys, True
    labels = list(task.labels or ())
    if not labels:
        raise DataError(f"{task.name}: the task has no fixed label names to offer as options")
    if ins.options == "words":
        return labels, labels, False
    return labels, list(LETTERS[: len(labels)]), True


def make_example(task: Task, record: Record, *, exemplar: bool = True) -> Example:
    """The prompt, target, choices and image of ``record`` under ``task``'s instruction."""
    ins = task.instruction
    if ins is None:
        raise DataError(f"task {task.name!r} has no instruction prompt; multimodal tasks: see ray_med.tasks.TASKS")
    if ins.image and record.image is None:
        raise DataError(f"{task.name}: record {record.id} has no image")
    question = ins.question or record.question
    if not question:
        raise DataError(f"{task.name}: record {record.id} has no question")
    context = record.context or ""
    lines = [f"Instructions: {ins.instruction}"]
    choices = gold = None
    if ins.kind == "choice":
        shown, choices, lettered = _choices(task, record)
        answer = record.answer if ins.options == "record" else (record.label or record.answer)
        valid = choices if ins.options == "record" else shown
        target = ""
        if answer is not None:  # None: an unlabelled item (a request, or a test split without answers)
            if answer not in valid:
                raise DataError(f"{task.name}: record {record.id} answer {answer!r} is not one of {valid}")
            gold = valid.index(answer)
            target = choices[gold]
    else:
        shown, lettered = None, False
        target = record.answer or record.text or ""
    if exemplar and ins.exemplar is not None:
        ex = ins.exemplar
        ex_shown = list(ex.options) if ex.options else shown
        ex_answer = ex.answer
        if ins.kind == "choice" and lettered and ex_shown:
            ex_answer = LETTERS[ex_shown.index(ex.answer)]
        ex_turn = _turn(ins, ex.context, EXEMPLAR_IMAGE, ex.question, ex_shown, lettered)
        lines.append(f"{ex_turn} {ex_answer}")
    lines.append(_turn(ins, context, IMAGE_TOKEN if ins.image else "", question, shown, lettered))
    return Example(id=record.id, prompt="\n".join(lines), target=target, choices=choices, gold=gold,
                   image=record.image if ins.image else None, task=task.name)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The ids the model writes for ``answer`` right after the answer cue ``A:``.

    Tokenized in context (``"A: <answer>"`` minus ``"A:"``), not alone: SentencePiece
    tokenizers (Llama-2's) turn a lone ``" B"`` into ``["▁", "▁B"]`` but write ``"▁B"`` after
    the cue, which is the token top-token scoring reads
    (:func:`ray_med.evaluation.qa.choice_token_ids`); byte-level BPE gives ``"ĠB"`` either way.
    """
    cue = tokenizer("A:", add_special_tokens=False)["input_ids"]
    full = tokenizer(f"A: {answer}", add_special_tokens=False)["input_ids"]
    k = next((i for i, (a, b) in enumerate(zip(cue, full, strict=False)) if a != b), len(cue))
    return full[k:]


@dataclass
class Encoded:
    """Token ids of one example: the prompt (image placeholder expanded) and the target, and the loss labels."""

    input_ids: list[int]
    labels: list[int]
    """-100 on the prompt (no loss), the target's ids (and eos) after it."""
    prompt_len: int
    has_image: bool


def encode_example(tokenizer: Any, ex: Example, *, image_token_id: int, n_image_tokens: int,
                   max_length: int, with_target: bool = True) -> Encoded:
    """Token ids of ``ex``: its one ``<image>`` becomes ``n_image_tokens`` image tokens; the target follows.

    The prompt must hold as many ``<image>`` markers as the example has images (0 or 1):
    more is a :class:`DataError`, as is a prompt that leaves no room for the target within
    ``max_length`` (the prompt's text context is cut first). ``with_target=False``
    encodes the prompt alone (inference).
    """
    n_markers = ex.prompt.count(IMAGE_TOKEN)
    n_images = 1 if ex.image is not None else 0
    if n_markers != n_images:
        raise DataError(f"{ex.task or 'prompt'} {ex.id}: the prompt has {n_markers} {IMAGE_TOKEN} marker(s) but "
                        f"{n_images} image(s)")
    ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if n_images:
        at = ids.index(image_token_id)
        ids = ids[:at] + [image_token_id] * n_image_tokens + ids[at + 1:]
    prompt = bos + ids
    target: list[int] = []
    if with_target:
        if not ex.target:
            raise DataError(f"{ex.task or 'prompt'} {ex.id}: has no answer to train or score on")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        target = answer_ids(tokenizer, ex.target)
        if len(target) + len(eos) > max_length // 2:  # a long report: keep its start, and the end of text
            target = target[: max(1, max_length // 2 - len(eos))]
        target = target + eos
    room = max_length - len(target)
    if len(prompt) > room:
        # Keep the instruction's start and the question's end: cut the middle (the exemplar
        # and the context), never the image tokens or the answer cue.
        keep_tail = min(len(prompt), max(room // 2, room - 16))
        tail = prompt[-keep_tail:]
        head = prompt[: max(0, room - keep_tail)]
        if n_images and tail.count(image_token_id) + head.count(image_token_id) != n_image_tokens:
            raise DataError(f"{ex.task or 'prompt'} {ex.id}: {len(prompt) + len(target)} tokens do not fit "
                            f"max_length {max_length} without cutting the image; raise max_length")
        prompt = head + tail
    if len(prompt) + len(target) > max_length or not prompt:
        raise DataError(f"{ex.task or 'prompt'} {ex.id}: does not fit max_length {max_length}")
    return Encoded(input_ids=prompt + target, labels=[-100] * len(prompt) + target, prompt_len=len(prompt),
                   has_image=bool(n_images))
