"""Iteration-level batching: many generations share one decode loop, one token per step.

:class:`BatchDecoder` holds the sequences being decoded. Each :meth:`~BatchDecoder.step`:

1. admits waiting sequences up to ``max_batch`` (a request that arrives while others
   decode joins at the next step, not after the whole batch);
2. prefills each newcomer's prompt alone (one forward pass, no padding; the samples of
   one prompt, e.g. sc_cot's ``n``, share that prefill) and samples its first token, so
   the time to first token is one prefill; the newcomers join their adapter's batch in
   one concatenation;
3. decodes one token for every running sequence of an adapter in one forward pass
   over a left-padded KV cache (per-row ``position_ids``, pads masked), then samples
   each row with the request's own temperature, top-p and ``torch.Generator``;
4. retires the sequences that stopped (end of sequence, a stop string, their own
   ``max_new_tokens``, or cancelled) and trims the cache columns no row needs.

Why left padding over per-sequence caches: one cache tensor per layer keeps the step
one batched matmul; a joining sequence's cache is padded on the left to the batch's
width (or the batch's to its), and leaving rows are dropped with ``index_select``.

Sequences with different adapters decode in per-adapter sub-batches (one forward per
adapter per step): a served adapter may stack several PEFT folders, which PEFT's
mixed-batch ``adapter_names`` cannot express, and the adapter switch is a flag flip.

Independence from the batch: each row's logits depend only on its own tokens (pads are
masked), and each sampled sequence draws from its own generator seeded by
:func:`sample_seed`, so a request's tokens are the same alone or in any batch, up to
float summation order: the tests check it token for token on CPU in float32; on a GPU in
bfloat16, kernels chosen by batch shape can flip a near-tied argmax.

Failure is per sequence: a bad request is refused by :meth:`BatchDecoder.submit`, and a
forward or sampling that raises ends only the sequences in it (``finish_reason``
``error``, with the exception), their cache dropped; the loop and the other rows go on.

No threads and no Ray: the caller drives :meth:`step` (the Serve replica on its compute
thread, between other model calls; ``evaluate.py qa`` in a plain loop).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ray_med.errors import DataError
from ray_med.tasks.prompts import PromptTooLong

MAX_TEMPERATURE = 2.0
# Below this a temperature is greedy: logits / 1e-40 overflow to inf and the softmax to NaN (vLLM's rule too).
GREEDY_BELOW = 1e-5


def sample_seed(seed: int, index: int = 0) -> int:
    """The generator seed of sample ``index`` of a request seeded ``seed``.

    The rule that makes sampled answers repeatable whatever the batch: sample ``j`` of a
    request with seed ``s`` draws from its own ``torch.Generator`` seeded with
    ``sample_seed(s, j)`` (a hash, so ``(s, 1)`` and ``(s + 1, 0)`` do not collide).
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**63


@dataclass
class GenRequest:
    """One sequence to decode."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    """Seeds this sequence's own generator (callers derive it with :func:`sample_seed`)."""
    adapter: str | None = None
    stop: Sequence[str] = ()

    def check(self, context: int) -> None:
        """One clear error for a request the loop must not take (it would fail the batch)."""
        if not self.prompt:
            raise DataError("the prompt is empty")
        if self.max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise DataError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise DataError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.prompt) + self.max_new_tokens > context:
            raise PromptTooLong(f"the prompt is {len(self.prompt)} tokens; with max_new_tokens={self.max_new_tokens} "
                                f"it exceeds the model's {context}-token context")


@dataclass(eq=False)
class Sequence_:
    """A request being decoded: its tokens so far, its text, and how it ended."""

    req: GenRequest
    on_text: Callable[[str], None] | None = None
    """Called (on the decoding thread) with each new piece of text, for streaming."""
    on_done: Callable[[Sequence_], None] | None = None
    """Called (on the decoding thread) once the sequence has ended."""
    id: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    """Characters of ``text`` already passed to ``on_text``."""
    finish_reason: str | None = None
    """stop, length, cancelled, or error (its forward or sampling raised: ``error``)."""
    error: Exception | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop at the next step (thread-safe: a flag the loop reads)."""
        self.cancelled = True


@dataclass(eq=False)
class _Group:
    """The running sequences of one adapter and their left-padded KV cache."""

    adapter: str | None
    seqs: list[Sequence_] = field(default_factory=list)
    cache: DynamicCache | None = None
    lengths: list[int] = field(default_factory=list)
    """Real (unpadded) tokens of each row in the cache."""

    @property
    def width(self) -> int:
        return 0 if self.cache is None else int(self.cache.layers[0].keys.shape[2])


class BatchDecoder:
    """Sequences decoded together: :meth:`submit` them, then call :meth:`step` until :meth:`busy` is false.

    ``use(adapter)`` is a context manager giving the model with ``adapter`` active (None:
    the base), e.g. :meth:`ray_med.adapters.host.HostedLM.use`.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 32,
                 use: Callable[[str | None], AbstractContextManager[Any]] | None = None) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self._use = use
        self.device = next(model.parameters()).device
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos = _eos_ids(model, tokenizer)
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x; the project allows >=5.0.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.waiting: deque[Sequence_] = deque()
        # Submissions land here under a lock, so a server's event loop can submit while the
        # compute thread steps; step() moves them to ``waiting``.
        self._inbox: list[Sequence_] = []
        self._lock = threading.Lock()
        self.groups: dict[str | None, _Group] = {}
        self._ids = itertools.count()
        self.stats = {"finished": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0, "steps": 0,
                      "max_batch_seen": 0}

    # ---- the queue

    def submit(self, req: GenRequest, on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Sequence_], None] | None = None) -> Sequence_:
        """Queue ``req`` (checked now: a bad request fails alone, never the batch it would join).

        Thread-safe. ``on_text`` gets each new piece of text and ``on_done`` the ended
        sequence, both on the thread that steps.
        """
        req.check(self.context)
        with self._lock:
            seq = Sequence_(req, on_text, on_done, id=next(self._ids))
            self._inbox.append(seq)
        return seq

    @property
    def active(self) -> int:
        # list(): one C-level copy, so a reader on another thread (the server's stats) never
        # iterates the dict while a step adds or drops a group.
        return sum(len(g.seqs) for g in list(self.groups.values()))

    def busy(self) -> bool:
        """Sequences waiting or running (call it from the stepping thread, or while no step runs)."""
        return bool(self._inbox) or bool(self.waiting) or self.active > 0

    def adapters_in_use(self) -> set[str | None]:
        queued = [*self.waiting, *self._inbox]
        return {g.adapter for g in list(self.groups.values()) if g.seqs} | {s.req.adapter for s in queued}

    # ---- one step

    def step(self) -> list[Sequence_]:
        """Admit, prefill newcomers, decode one token for every running sequence; the sequences that ended."""
        ended: list[Sequence_] = []
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        # Cancelled while waiting: never started.
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            ended.append(self._finish(seq, "cancelled"))
        # Cancelled while running: out of the batch before it spends another token on them.
        for group in list(self.groups.values()):
            ended += self._retire(group)
        newcomers: list[Sequence_] = []
        while self.waiting and self.active + len(newcomers) < self.max_batch:
            newcomers.append(self.waiting.popleft())
        with torch.inference_mode():
            for group in list(self.groups.values()):
                if group.seqs:
                    try:
                        self._decode(group)
                    except Exception as exc:  # noqa: BLE001  a failed forward (e.g. out of memory) fails its
                        # rows, and its cache with them, never the loop or the other adapters' rows
                        del self.groups[group.adapter]
                        ended += [self._fail(seq, exc) for seq in group.seqs]
            ended += self._prefill(newcomers)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], self.active)
            for group in list(self.groups.values()):
                ended += self._retire(group)
        self.stats["steps"] += 1
        return ended

    def run(self, requests: Iterable[GenRequest]) -> list[Sequence_]:
        """Decode ``requests`` to the end; the sequences in request order (an offline batch).

        The first sequence's error is raised, once every sequence has ended.
        """
        seqs = [self.submit(r) for r in requests]
        while self.busy():
            self.step()
        raise_first_error(seqs)
        return seqs

    # ---- internals

    def _forward(self, adapter: str | None, **inputs: Any) -> Any:
        if self._use is None:
            return self.model(**inputs, use_cache=True, logits_to_keep=1)
        with self._use(adapter) as model:
            # logits_to_keep=1: a prefill computes the logits of its last position only.
            return model(**inputs, use_cache=True, logits_to_keep=1)

    def _prefill(self, newcomers: list[Sequence_]) -> list[Sequence_]:
        """Each distinct prompt (per adapter) in one forward alone; its samples share that prefill's cache.

        Returns the sequences whose prefill failed (ended with their error).
        """
        failed: list[Sequence_] = []
        shared: dict[tuple, list[Sequence_]] = {}
        for seq in newcomers:  # sc_cot's n samples of a prompt: one prefill, n rows
            shared.setdefault((seq.req.adapter, tuple(seq.req.prompt)), []).append(seq)
        joining: dict[str | None, list[tuple[Sequence_, DynamicCache]]] = {}
        for (adapter, prompt), seqs in shared.items():
            ids = torch.tensor([list(prompt)], device=self.device)
            cache = DynamicCache()
            try:
                # The cache is filled in place.
                out = self._forward(adapter, input_ids=ids, attention_mask=torch.ones_like(ids),
                                    **{self._cache_kw: cache})
                for seq in seqs:
                    seq.generator = torch.Generator(device="cpu").manual_seed(seq.req.seed)
                tokens = self._sample(out.logits[:, -1].expand(len(seqs), -1), seqs)
            except Exception as exc:  # noqa: BLE001  this prompt's sequences fail, the batch goes on
                failed += [self._fail(seq, exc) for seq in seqs]
                continue
            for seq, token in zip(seqs, tokens, strict=True):
                joining.setdefault(adapter, []).append((seq, cache))
                self._append(seq, token)
        for adapter, rows in joining.items():
            self._join(self.groups.setdefault(adapter, _Group(adapter)), rows)
        return failed

    def _join(self, group: _Group, rows: list[tuple[Sequence_, DynamicCache]]) -> None:
        """Add one-row caches to the group's in one concatenation, each padded on the left to the widest."""
        parts = [(group.cache, group.lengths)] if group.seqs else []
        parts += [(cache, [len(seq.req.prompt)]) for seq, cache in rows]
        width = max(int(c.layers[0].keys.shape[2]) for c, _ in parts)
        joined = rows[0][1] if len(parts) == 1 else DynamicCache()
        if len(parts) > 1:
            for i in range(len(parts[0][0].layers)):
                keys = [_pad_left(c.layers[i].keys, width - c.layers[i].keys.shape[2]) for c, _ in parts]
                values = [_pad_left(c.layers[i].values, width - c.layers[i].values.shape[2]) for c, _ in parts]
                joined.update(torch.cat(keys), torch.cat(values), i)
        group.cache = joined
        group.lengths = [n for _, lengths in parts for n in lengths]
        group.seqs = (group.seqs if group.seqs else []) + [seq for seq, _ in rows]

    def _decode(self, group: _Group) -> None:
        width, n = group.width, len(group.seqs)
        lengths = torch.tensor(group.lengths, device=self.device)
        # Row i's real tokens are the last lengths[i] columns; the new token is one more.
        cols = torch.arange(width + 1, device=self.device)
        mask = (cols[None, :] >= (width - lengths)[:, None]).long()
        ids = torch.tensor([[s.tokens[-1]] for s in group.seqs], device=self.device)
        out = self._forward(group.adapter, input_ids=ids, attention_mask=mask, position_ids=lengths[:, None],
                            **{self._cache_kw: group.cache})
        tokens = self._sample(out.logits[:, -1], group.seqs)
        group.lengths = [n_ + 1 for n_ in group.lengths]
        for seq, token in zip(group.seqs, tokens, strict=True):
            self._append(seq, token)
        assert len(group.seqs) == n

    def _sample(self, logits: torch.Tensor, seqs: Sequence[Sequence_]) -> list[int]:
        logits = logits.float()
        out = []
        for row, seq in zip(logits, seqs, strict=True):
            req = seq.req
            if req.temperature < GREEDY_BELOW:
                out.append(int(row.argmax()))
                continue
            probs = torch.softmax(row / req.temperature, dim=-1).cpu()
            if req.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < req.top_p  # the smallest set reaching top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
        return out

    def _append(self, seq: Sequence_, token: int) -> None:
        if token in self.eos:
            seq.finish_reason = "stop"
            return
        seq.tokens.append(token)
        self.stats["generated_tokens"] += 1
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cut = _first_stop(text, seq.req.stop)
        if cut is not None:
            seq.text, seq.finish_reason = text[:cut], "stop"
        else:
            seq.text = text
            if len(seq.tokens) >= seq.req.max_new_tokens:
                seq.finish_reason = "length"
        self._emit(seq)

    def _emit(self, seq: Sequence_) -> None:
        if seq.on_text is None:
            return
        safe = len(seq.text)
        if not seq.done:
            # Hold back a tail that may still become a stop string, and a half-decoded character.
            hold = max((len(s) - 1 for s in seq.req.stop), default=0)
            safe -= hold
            while safe > seq.emitted and seq.text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > seq.emitted:
            seq.on_text(seq.text[seq.emitted:safe])
            seq.emitted = safe

    def _retire(self, group: _Group) -> list[Sequence_]:
        for seq in group.seqs:
            if seq.cancelled and not seq.done:
                seq.finish_reason = "cancelled"
        keep = [i for i, s in enumerate(group.seqs) if not s.done]
        ended = [self._finish(s, s.finish_reason or "stop") for s in group.seqs if s.done]
        if not ended:
            return []
        if not keep:
            del self.groups[group.adapter]
            return ended
        group.seqs = [group.seqs[i] for i in keep]
        group.lengths = [group.lengths[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        trim = group.width - max(group.lengths)  # columns that are padding in every remaining row
        for layer in group.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        return ended

    def _fail(self, seq: Sequence_, exc: Exception) -> Sequence_:
        seq.error = exc
        return self._finish(seq, "error")

    def _finish(self, seq: Sequence_, reason: str) -> Sequence_:
        seq.finish_reason = reason
        self.stats[{"cancelled": "cancelled", "error": "failed"}.get(reason, "finished")] += 1
        self._emit(seq)
        if seq.on_done is not None:
            seq.on_done(seq)
        return seq


def raise_first_error(seqs: Iterable[Sequence_]) -> None:
    """Raise the error of the first sequence that failed, if any did."""
    for seq in seqs:
        if seq.error is not None:
            raise seq.error


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return x
    return torch.cat([x.new_zeros((*x.shape[:2], n, x.shape[3])), x], dim=2)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}
