"""Running the multimodal model on examples: batches, class probabilities from the option letters, generation. No Ray.

Training (:mod:`ray_med.training.vlm`), ``evaluate.py multimodal`` and the Serve
deployment all go through these functions, so an item gets the same tokens, the same
pixels and the same scores offline and online:

* :class:`Prepared` is an example encoded once (:func:`prepare`): its token ids with the
  image tokens in place, its loss labels, the token ids of its choices, its image bytes;
* :class:`Pixels` turns image bytes into the tower's input through
  :func:`ray_med.data.images.preprocess`, memoised by content;
* :func:`collate` right-pads a batch and stacks the pixels of the items that have an
  image, in order (LLaVA fills the image tokens from them in that order);
* :func:`choice_probs` reads the next-token distribution after the prompt, restricted to
  the choices' first tokens and renormalised: a probability for every class, from which
  macro AUROC and macro F1 follow;
* :func:`generate_texts` decodes greedily (or samples, seeded) for generation tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ray_med.data.images import ImageSpec, preprocess
from ray_med.errors import DataError
from ray_med.evaluation.metrics import classification_metrics
from ray_med.evaluation.qa import choice_token_ids
from ray_med.models.vlm import image_geometry, image_tokens
from ray_med.tasks.instructions import Example, encode_example


@dataclass
class Prepared:
    """One example, encoded for this model."""

    id: str
    task: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    image: bytes | None
    choice_ids: list[int] | None
    gold: int | None
    target: str


@dataclass
class ModelGeometry:
    """What encoding needs to know about the model: its image token, how many, and its tower's input."""

    image_token_id: int
    n_image_tokens: int
    spec: ImageSpec

    @classmethod
    def of(cls, config: Any) -> ModelGeometry:
        return cls(config.image_token_id, image_tokens(config), ImageSpec(*image_geometry(config)))


def prepare(tokenizer: Any, ex: Example, geo: ModelGeometry, max_length: int, *,
            with_target: bool = True) -> Prepared:
    """Encode ``ex`` (see :func:`ray_med.tasks.instructions.encode_example`) with its choices' token ids."""
    enc = encode_example(tokenizer, ex, image_token_id=geo.image_token_id, n_image_tokens=geo.n_image_tokens,
                         max_length=max_length, with_target=with_target)
    choice_ids = choice_token_ids(tokenizer, ex.choices) if ex.choices else None
    return Prepared(ex.id, ex.task, enc.input_ids, enc.labels, enc.prompt_len, ex.image, choice_ids, ex.gold,
                    ex.target)


class Pixels:
    """Image bytes -> the tower's (3, S, S) tensor, memoised by a hash of the bytes, up to ``max_bytes`` of tensors.

    Keyed by content, not by item id: two files (or a training and an evaluation split)
    may reuse ids, and a memo keyed by id would hand one item another's pixels. The bound
    is in bytes (a 224 px tensor is 600 KB), per process.
    """

    def __init__(self, spec: ImageSpec, max_bytes: int = 2 * 1024**3) -> None:
        self.spec, self.max_bytes, self.used = spec, max_bytes, 0
        self._memo: dict[bytes, torch.Tensor] = {}

    def __call__(self, image: bytes) -> torch.Tensor:
        key = hashlib.blake2b(image, digest_size=16).digest()
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        t = torch.from_numpy(preprocess(image, self.spec))
        size = t.numel() * t.element_size()
        if self.used + size <= self.max_bytes:
            self._memo[key] = t
            self.used += size
        return t


def collate(batch: Sequence[Prepared], pixels: Pixels, pad_id: int, *, prompt_only: bool = False,
            dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Right-padded ids, mask and labels, and the stacked pixels of the items with an image (None when none)."""
    seqs = [p.input_ids[: p.prompt_len] if prompt_only else p.input_ids for p in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(batch, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        if not prompt_only:
            labels[i, : len(s)] = torch.tensor(p.labels)
    images = [pixels(p.image) for p in batch
              if p.image is not None]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.stack(images).to(dtype) if images else None,
            "lengths": [len(s) for s in seqs]}


def _forward(model: torch.nn.Module, b: dict[str, Any], device: torch.device) -> Any:
    kwargs = {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device)}
    if b["pixel_values"] is not None:
        kwargs["pixel_values"] = b["pixel_values"].to(device)
    return model(**kwargs)


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def choice_probs(model: torch.nn.Module, items: Sequence[Prepared], pixels: Pixels, pad_id: int, *,
                 batch_size: int = 16) -> np.ndarray:
    """(n, k) probabilities over each item's choices, from the next-token logits after its prompt."""
    if not items:
        return np.zeros((0, 0))
    k = len(items[0].choice_ids or [])
    if any(p.choice_ids is None or len(p.choice_ids) != k for p in items):
        raise DataError("choice_probs: every item needs the same number of choices")
    was = model.training
    model.eval()
    device, dtype = _device_dtype(model)
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        b = collate(chunk, pixels, pad_id, prompt_only=True, dtype=dtype)
        logits = _forward(model, b, device).logits
        last = torch.tensor(b["lengths"], device=logits.device) - 1
        rows = logits[torch.arange(len(chunk), device=logits.device), last].float()
        ids = torch.tensor([p.choice_ids for p in chunk], device=logits.device)
        out.append(torch.softmax(rows.gather(1, ids), dim=-1).cpu().numpy())
    model.train(was)
    return np.concatenate(out)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, items: Sequence[Prepared], pixels: Pixels, pad_id: int, *,
              batch_size: int = 16) -> float:
    """Teacher-forced loss per target token over ``items`` (dev loss of generation tasks)."""
    was = model.training
    model.eval()
    device, dtype = _device_dtype(model)
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        b = collate(items[i : i + batch_size], pixels, pad_id, dtype=dtype)
        logits = _forward(model, b, device).logits[:, :-1].float()
        labels = b["labels"][:, 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, items: Sequence[Prepared], pixels: Pixels, *,
                   max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                   stopping_criteria: Any = None, batch_size: int = 8) -> list[tuple[str, int]]:
    """(text, generated token count) for each item's prompt; greedy unless ``temperature`` > 0 (then seeded)."""
    device, dtype = _device_dtype(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[tuple[str, int]] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        seqs = [p.input_ids[: p.prompt_len] for p in chunk]
        width = max(len(s) for s in seqs)
        # Left padding: every prompt ends where generation starts.
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, width - len(s):] = torch.tensor(s)
            mask[j, width - len(s):] = 1
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        images = [pixels(p.image) for p in chunk if p.image is not None]
        if images:
            kwargs["pixel_values"] = torch.stack(images).to(device, dtype)
        if temperature > 0:
            torch.manual_seed(seed)
        out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             stopping_criteria=stopping_criteria)
        for row in out[:, width:]:
            toks = row.tolist()
            if tokenizer.eos_token_id in toks:
                toks = toks[: toks.index(tokenizer.eos_token_id)]
            toks = [t for t in toks if t != pad]
            results.append((tokenizer.decode(toks, skip_special_tokens=True).strip(), len(toks)))
    return results


def loss_fn(model: torch.nn.Module) -> Callable[[dict[str, Any]], torch.Tensor]:
    """The training loss of a collated batch: the model's own shifted cross-entropy over the target tokens."""
    def run(b: dict[str, Any]) -> torch.Tensor:
        device, _ = _device_dtype(model)
        kwargs = {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
                  "labels": b["labels"].to(device)}
        if b["pixel_values"] is not None:
            kwargs["pixel_values"] = b["pixel_values"].to(device)
        return model(**kwargs).loss

    return run


def score_task(model: Any, tokenizer: Any, task: Any, examples: Sequence[Example], geo: ModelGeometry, *,
               max_length: int = 512, bootstrap: int = 1000, seed: int = 0, max_new_tokens: int = 64,
               batch_size: int = 16, pixels: Pixels | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-item predictions) of ``task`` on ``examples``: MultiMedBench's metric for its kind.

    Choice tasks: a probability per class from the option letters, then macro AUROC with
    a bootstrap CI, macro F1 and accuracy. VQA: BLEU-1, token F1 and exact match (and
    closed-question accuracy). Reports: BLEU, BLEU-1 and ROUGE-L.
    """
    from ray_med.evaluation.text_metrics import generation_metrics  # lazy: sacrebleu and rouge-score

    pixels = pixels or Pixels(geo.spec)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unlabelled = [ex.id for ex in examples if not ex.target]
    if unlabelled:
        raise DataError(f"{task.name}: {len(unlabelled)} of {len(examples)} items have no answer to score against "
                        f"(first: {unlabelled[0]})")
    items = [prepare(tokenizer, ex, geo, max_length, with_target=False) for ex in examples]
    ins = task.instruction
    if ins.kind == "choice":
        probs = choice_probs(model, items, pixels, pad, batch_size=batch_size)
        y = np.array([p.gold for p in items])
        k = probs.shape[1]
        metrics = classification_metrics(y, probs, "binary" if k == 2 else "multiclass", n_bootstrap=bootstrap,
                                         seed=seed)
        names = list(task.labels) if ins.options in ("labels", "words") else list(examples[0].choices or [])
        preds = [{"id": p.id, "gold": names[p.gold] if p.gold is not None else None,
                  "prediction": names[int(row.argmax())],
                  "probabilities": {n: round(float(v), 6) for n, v in zip(names, row, strict=True)}}
                 for p, row in zip(items, probs, strict=True)]
        metrics["labels"] = names
        metrics["auroc_ci"] = metrics["auroc_macro_ci"]
        return metrics, preds
    texts = generate_texts(model, tokenizer, items, pixels, max_new_tokens=max_new_tokens, seed=seed,
                           batch_size=batch_size)
    metrics = generation_metrics([t for t, _ in texts], [p.target for p in items], ins.metric)
    preds = [{"id": p.id, "reference": p.target, "prediction": t} for p, (t, _) in zip(items, texts, strict=True)]
    return metrics, preds
