"""What the Serve deployments compute, as plain objects: no Ray, testable in process.

:class:`LMEngine` holds a causal LM and its LoRA adapters for QA, generation and chat;
:class:`VLMEngine` holds a multimodal (LLaVA) model for generation and chat with an
image and for image classification, through the same functions as its training and
``evaluate.py multimodal`` (:mod:`ray_med.evaluation.multimodal`: the same tokens, the
same pixels, the same scores); :class:`ClassifierEngine` holds the stage-2 classifiers of ``jobs/finetune.py``. Both
load adapters on demand and drop them when told (the deployment's LRU decides when),
and both call the same functions as the offline evaluation job
(:mod:`ray_med.evaluation.qa`, :mod:`ray_med.evaluation.classify`), which is why
``evaluate.py`` and the endpoints give the same answers.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ray_med.adapters.classifier import (
    adapter_folders,
    check_classifier_dir,
    labels_of,
    load_classifier,
    load_head,
    shares_base,
)
from ray_med.adapters.host import AdapterHost, load_lm
from ray_med.adapters.stacking import SequenceClassifier
from ray_med.data.records import Record
from ray_med.errors import DataError, ModelError
from ray_med.evaluation.classify import encode_texts, predict
from ray_med.evaluation.config import QAConfig
from ray_med.evaluation.multimodal import (
    ModelGeometry,
    Pixels,
    Prepared,
    choice_probs,
    generate_texts,
    prepare,
)
from ray_med.evaluation.qa import (
    QAResult,
    choice_token_ids,
    context_length,
    cot_requests,
    cot_result,
    prompt_limit,
    top_token,
)
from ray_med.generation.decoder import BatchDecoder, GenRequest, Sequence_, raise_first_error, sample_seed
from ray_med.generation.spec import GenSpec
from ray_med.models import inference_device, load_base_model, load_tokenizer
from ray_med.models.vlm import IMAGE_TOKEN, add_image_token, load_vlm
from ray_med.serving.errors import HTTPError
from ray_med.serving.schemas import data_url_base64, image_bytes
from ray_med.tasks.instructions import Example, make_example
from ray_med.tasks.prompts import PromptTooLong, QAItem, fit_prompt, select_shots
from ray_med.tasks.registry import TASKS, get_multimodal_task, multimodal_tasks


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads (0 leaves torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


def sampling_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one: unseeded sampling differs from call to call."""
    return secrets.randbits(63) if seed is None else seed


class Cancelled(StoppingCriteria):
    """Stops generation between tokens once ``flag`` is set (the request was cancelled or timed out)."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), device=input_ids.device, dtype=torch.bool)


def _stops(cancel: threading.Event | None) -> StoppingCriteriaList | None:
    return None if cancel is None else StoppingCriteriaList([Cancelled(cancel)])


@dataclass
class Generation:
    """A generated text, its token counts and why it ended (stop, length or cancelled)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"


def message_text(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Chat messages with string contents: text parts joined; an image part is refused (a text-only model)."""
    turns = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            if any(p.get("type") != "text" for p in content):
                raise DataError("the served model is text-only: content parts must be text")
            content = "".join(p["text"] for p in content)
        turns.append({"role": m["role"], "content": content})
    return turns


class LMEngine:
    """A causal LM with its tokenizer and LoRA adapters: QA, generation and chat.

    Every generation (``/v1/generate``, chat, completions, cot and sc_cot QA) goes
    through one :class:`~ray_med.generation.decoder.BatchDecoder`: the Serve replica
    submits requests as they arrive and drives :meth:`step` on its compute thread, so
    concurrent requests decode together. In process, :meth:`complete` and
    :meth:`chain_of_thought` decode one request to the end.
    """

    def __init__(self, model_path: str, adapters: dict[str, str], *, qa: QAConfig | None = None,
                 shots: Sequence[QAItem] = (), max_batch: int = 32) -> None:
        self.model_path = model_path
        self.lm = load_lm(model_path, adapters)
        self.model, self.tokenizer, self.host = self.lm.model, self.lm.tokenizer, self.lm.host
        self.qa = qa or QAConfig()
        self.shots = list(shots)
        self.decoder = BatchDecoder(self.model, self.tokenizer, max_batch=max_batch, use=self.lm.use)
        self._deferred: set[str] = set()

    @property
    def adapters(self) -> dict[str, str]:
        return self.lm.adapters

    def load_adapter(self, name: str) -> None:
        self._deferred.discard(name)
        self.lm.load_adapter(name)

    def unload_adapter(self, name: str) -> None:
        # The adapter cache may evict an adapter that sequences still decode with: it is
        # dropped once they end (step), not under them.
        if name in self.decoder.adapters_in_use():
            self._deferred.add(name)
        else:
            self.lm.unload_adapter(name)

    def step(self) -> list[Sequence_]:
        """One decode step of every running sequence; the sequences that ended."""
        ended = self.decoder.step()
        for name in self._deferred - self.decoder.adapters_in_use():
            self._deferred.discard(name)
            self.lm.unload_adapter(name)
        return ended

    def submit(self, req: GenRequest, on_text: Any = None, on_done: Any = None) -> Sequence_:
        """Queue one sequence (checked first: a bad one fails alone); it joins the batch at the next step.

        Thread-safe: the replica's event loop submits while the compute thread steps.
        """
        if req.adapter is not None and req.adapter not in self.lm.adapters:
            raise HTTPError(404, f"unknown adapter {req.adapter!r}; available: {sorted(self.lm.adapters) or 'none'}",
                            "unknown_adapter")
        return self.decoder.submit(req, on_text, on_done)

    def run_for(self, seconds: float) -> bool:
        """Steps back to back while sequences run, for at most ``seconds`` (at least one); whether still busy.

        The replica calls it on its compute thread: a model call queued behind it (an
        adapter load, a top-token batch) waits at most ``seconds``, and the thread hop is
        paid once per call, not once per token.
        """
        end = time.perf_counter() + seconds
        while self.decoder.busy():
            self.step()
            if time.perf_counter() >= end:
                break
        return self.decoder.busy()

    def decode(self, reqs: Sequence[GenRequest], cancel: threading.Event | None = None) -> list[Sequence_]:
        """Decode ``reqs`` to the end in process (stops within one token once ``cancel`` is set)."""
        seqs = [self.submit(r) for r in reqs]
        while not all(s.done for s in seqs):
            if cancel is not None and cancel.is_set():
                for s in seqs:
                    s.cancel()
            self.step()
        raise_first_error(seqs)
        return seqs

    def qa_config(self, **request: Any) -> QAConfig:
        """The server's QA settings with a request's mode, n, temperature and seed applied."""
        return replace(self.qa, **{k: v for k, v in request.items() if v is not None})

    def qa_prompts(self, items: Sequence[QAItem], cfg: QAConfig) -> list[list[int]]:
        """Prompt ids (with the server's exemplars), checked against the model's context."""
        if cfg.mode == "top_token":  # fail this request now, not the whole batch it would join
            for it in items:
                choice_token_ids(self.tokenizer, it.choices)
        limit = prompt_limit(self.model, cfg)
        return [fit_prompt(self.tokenizer, it, select_shots(self.shots, cfg.shots, cfg.seed, it), cfg.mode, limit)
                for it in items]

    def top_token(self, prompts: Sequence[list[int]], choices: Sequence[Sequence[str]],
                  adapter: str | None) -> list[QAResult]:
        # In process, callers need not load an adapter first. Under Serve the multiplexed
        # LRU has already loaded it, so the load is a no-op there.
        with self.lm.use(adapter) as model:
            return top_token(model, self.tokenizer, prompts, choices)

    def cot_requests(self, prompt: list[int], cfg: QAConfig, adapter: str | None, *,
                     seed: int | None = None) -> list[GenRequest]:
        """cot / sc_cot's sequences; sc_cot samples with ``seed`` (None: a random one).

        ``cfg.seed`` chose the prompt's exemplars; the sampling seed is the request's own.
        """
        return cot_requests(prompt, cfg, seed=sampling_seed(seed), adapter=adapter)

    def chain_of_thought(self, prompt: list[int], choices: Sequence[str], cfg: QAConfig, adapter: str | None, *,
                         seed: int | None = None, cancel: threading.Event | None = None) -> QAResult:
        """cot or sc_cot of one prompt, decoded to the end in process."""
        seqs = self.decode(self.cot_requests(prompt, cfg, adapter, seed=seed), cancel)
        return cot_result([s.text for s in seqs], choices)

    def encode_prompt(self, text: str, max_new_tokens: int) -> list[int]:
        """Prompt ids, or a clear error when the prompt and the tokens to generate overflow the context."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        context = context_length(self.model)
        if len(ids) + max_new_tokens > context:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                                f"exceeds the model's {context}-token context")
        return ids

    def gen_request(self, spec: GenSpec, adapter: str | None) -> GenRequest:
        """The sequence a request decodes: its prompt (or chat) encoded against the context, seeded by its own seed.

        Its other limits (temperature, top_p, max_new_tokens) are checked when it is submitted.
        """
        if spec.image is not None:
            raise DataError("the served model is text-only; images need a multimodal model")
        if spec.messages is not None:
            text = self.chat_prompt(message_text(spec.messages))
        elif spec.prompt is not None:
            text = spec.prompt
        else:
            raise DataError("send a prompt or messages")
        req = GenRequest(self.encode_prompt(text, spec.max_new_tokens), spec.max_new_tokens,
                         temperature=spec.temperature, top_p=spec.top_p, seed=sample_seed(sampling_seed(spec.seed)),
                         adapter=adapter or None, stop=tuple(spec.stop))
        return req

    def complete(self, text: str, *, max_new_tokens: int, temperature: float, seed: int | None,
                 adapter: str | None, cancel: threading.Event | None = None) -> Generation:
        """One generation request decoded in process; it stops within one token once ``cancel`` is set."""
        req = self.gen_request(GenSpec(prompt=text, max_new_tokens=max_new_tokens, temperature=temperature,
                                       seed=seed), adapter)
        (seq,) = self.decode([req], cancel)
        return generation(seq)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The tokenizer's chat template when it has one, else plain "role: content" turns."""
        return render_chat(self.tokenizer, messages)


def generation(seq: Sequence_) -> Generation:
    """A decoded sequence as a Generation."""
    return Generation(seq.text, len(seq.req.prompt), len(seq.tokens), seq.finish_reason or "stop")


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """A chat as one prompt: the tokenizer's chat template when it has one, else plain "Role: content" turns."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # templates raise on e.g. roles out of order  # noqa: BLE001
            raise DataError(f"the model's chat template refused these messages: {exc}") from None
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(turns) + "\nAssistant:"


def image_classification_tasks() -> list[str]:
    """The multimodal tasks /v1/classify answers: an image and a fixed set of classes."""
    return [n for n in multimodal_tasks() if _classifies_images(n)]


def _classifies_images(name: str) -> bool:
    ins = TASKS[name].instruction
    return ins is not None and ins.kind == "choice" and ins.image and ins.options in ("labels", "words")


class VLMEngine:
    """A multimodal (LLaVA) model and its tokenizer: generation and chat with an image, image classification.

    A request is an :class:`~ray_med.tasks.instructions.Example` encoded by
    :func:`~ray_med.evaluation.multimodal.prepare` (its ``<image>`` marker expanded to the
    model's image tokens) and its image prepared by
    :class:`~ray_med.evaluation.multimodal.Pixels` (:func:`ray_med.data.images.preprocess`),
    so a served answer is the one training and ``evaluate.py multimodal`` would give.
    The model takes at most one image per prompt.
    """

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        device, dtype = inference_device()
        model, self.tokenizer = load_vlm(model_path, dtype=dtype)
        self.model = model.to(device).eval()
        add_image_token(self.tokenizer)  # a no-op for a folder this project wrote; as evaluate.py does
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.geo = ModelGeometry.of(self.model.config)
        self.context = int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 2048))

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def pixels(self) -> Pixels:
        # Requests rarely repeat an image: nothing is kept.
        return Pixels(self.geo.spec, max_bytes=0)

    def encode(self, prompt: str, image: bytes | None, *, max_new_tokens: int = 0,
               choices: list[str] | None = None) -> Prepared:
        """The prompt's ids (image tokens in place), or a clear error: marker count, context overflow."""
        markers = prompt.count(IMAGE_TOKEN)
        n_images = 0 if image is None else 1
        if markers > n_images or (n_images and not markers):
            have = "no image" if image is None else "one image"
            raise DataError(f"the prompt has {markers} {IMAGE_TOKEN} marker(s) and {have}: send one {IMAGE_TOKEN} "
                            "per image (this model takes at most one image per prompt)")
        ex = Example(id="request", prompt=prompt, target="", choices=choices, image=image, task="request")
        # No cut to fit: a request's prompt is used whole, or refused as too long.
        p = prepare(self.tokenizer, ex, self.geo, max_length=2**31, with_target=False)
        if len(p.input_ids) + max_new_tokens > self.context:
            with_new = f"; with max_new_tokens={max_new_tokens} it" if max_new_tokens else ", which"
            of_image = f" ({self.geo.n_image_tokens} of them the image's)" if n_images else ""
            raise PromptTooLong(f"the prompt is {len(p.input_ids)} tokens{of_image}{with_new} exceeds the model's "
                                f"{self.context}-token context")
        return p

    def complete(self, text: str, image: bytes | None = None, *, max_new_tokens: int, temperature: float,
                 seed: int | None, cancel: threading.Event | None = None) -> Generation:
        """One generation; an image without an ``<image>`` marker in ``text`` goes in front of it."""
        prompt = f"{IMAGE_TOKEN}\n{text}" if image is not None and IMAGE_TOKEN not in text else text
        p = self.encode(prompt, image, max_new_tokens=max_new_tokens)
        (out, n), = generate_texts(self.model, self.tokenizer, [p], self.pixels(), max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=sampling_seed(seed),
                                   stopping_criteria=_stops(cancel))
        return Generation(out, len(p.input_ids), n)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, bytes | None]:
        """(prompt, image bytes or None) of a chat whose contents may be OpenAI parts.

        An ``image_url`` part (a ``data:`` URL: the server fetches nothing) becomes an
        ``<image>`` marker where it stands; text parts are joined as they are.
        """
        images: list[str] = []
        turns = []
        for m in messages:
            content = m["content"]
            if not isinstance(content, str):
                pieces = []
                for part in content:
                    if part["type"] == "image_url":
                        images.append(data_url_base64(part["image_url"]["url"]))
                        pieces.append(IMAGE_TOKEN)
                    elif part["type"] == "text":
                        pieces.append(part["text"])
                    else:
                        raise DataError(f"unknown content part type {part['type']!r}; use text or image_url")
                content = "".join(pieces)
            turns.append({"role": m["role"], "content": content})
        if len(images) > 1:
            raise DataError(f"the messages hold {len(images)} images; this model takes one image per prompt")
        return render_chat(self.tokenizer, turns), image_bytes(images[0]) if images else None

    def classify_image(self, task_name: str, image: bytes, question: str | None = None) -> dict[str, Any]:
        """Label and class probabilities of ``image`` under a multimodal image-classification task (e.g. pneumonia).

        The probabilities are the next-token distribution over the options' letters,
        renormalised, as ``evaluate.py multimodal`` scores the task. ``question``: for a
        task without a fixed question of its own.
        """
        task = get_multimodal_task(task_name)
        if not _classifies_images(task.name):
            raise DataError(f"task {task.name!r} does not classify an image; image classification tasks: "
                            f"{', '.join(image_classification_tasks())}")
        ins = task.instruction
        assert ins is not None and task.labels
        if question is not None and ins.question:
            raise DataError(f"task {task.name!r} asks its own question ({ins.question!r}); send no text")
        record = Record(id="request", source="request", image=image, question=question)  # no gold label
        ex = make_example(task, record)
        p = self.encode(ex.prompt, image, choices=ex.choices)
        probs = choice_probs(self.model, [p], self.pixels(), self.pad_id)[0]
        labels = list(task.labels)
        return {"label": labels[int(probs.argmax())],
                "probabilities": {lab: round(float(v), 6) for lab, v in zip(labels, probs, strict=True)}}


@dataclass
class _Loaded:
    model: SequenceClassifier
    host: AdapterHost | None
    tokenizer: Any
    meta: dict[str, Any]


class ClassifierEngine:
    """The stage-2 classifiers by served name; those over the same base share its weights."""

    def __init__(self, classifiers: dict[str, str], *, max_length: int = 256) -> None:
        self.paths = dict(classifiers)
        self.meta = {name: check_classifier_dir(path) for name, path in self.paths.items()}
        self.max_length = max_length
        self._bases: dict[str, tuple[AdapterHost, Any]] = {}
        self._loaded: dict[str, _Loaded] = {}

    def load(self, name: str) -> None:
        if name in self._loaded:
            return
        if name not in self.paths:
            raise ModelError(f"unknown classifier {name!r}; this server has {sorted(self.paths) or 'none'}")
        meta, path = self.meta[name], self.paths[name]
        if not shares_base(path, meta):  # full fine-tunes and non-LoRA adapters: their own copy of the body
            model, _ = load_classifier(path)
            model = model.to(inference_device()[0])
            tok = load_tokenizer(f"{path}/model" if meta.get("setting") == "full" else meta["base_model"])
            self._loaded[name] = _Loaded(model, None, tok, meta)
            return
        base_path = meta["base_model"]
        if base_path not in self._bases:
            device, dtype = inference_device()
            base = load_base_model(base_path, dtype=dtype).to(device).eval()
            self._bases[base_path] = (AdapterHost(base), load_tokenizer(base_path))
        host, tok = self._bases[base_path]
        host.load(name, adapter_folders(path, meta))
        model = SequenceClassifier(host.model, host.model.config.hidden_size, meta["num_labels"], meta["pooling"])
        load_head(model, path).head.to(next(host.model.parameters()).device)
        self._loaded[name] = _Loaded(model.eval(), host, tok, meta)

    def unload(self, name: str) -> None:
        entry = self._loaded.pop(name, None)
        if entry is not None and entry.host is not None:
            entry.host.unload(name)

    def labels(self, name: str) -> list[str]:
        return labels_of(self.meta[name])

    def classify(self, name: str, texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> list[dict]:
        """Label and probabilities for each text (and second segment), as the evaluate job scores them."""
        self.load(name)
        entry = self._loaded[name]
        pair_list = None
        if pairs is not None and any(p is not None for p in pairs):
            if not all(p is not None for p in pairs):  # a batch mixes single texts and pairs
                return [r for i in range(len(texts)) for r in self.classify(name, [texts[i]], [pairs[i]])]
            pair_list = list(pairs)
        inputs = encode_texts(entry.tokenizer, list(texts), pair_list, self.max_length)
        task_type = entry.meta.get("task_type", "multiclass")
        if entry.host is None:
            probs = predict(entry.model, inputs, task_type)
        else:
            with entry.host.use(name):
                probs = predict(entry.model, inputs, task_type)
        labels = self.labels(name)
        out = []
        for row in probs:
            result = {"label": labels[int(row.argmax())],
                      "probabilities": {lab: round(float(p), 6) for lab, p in zip(labels, row, strict=True)}}
            if task_type == "multilabel":
                result["labels"] = [lab for lab, p in zip(labels, row, strict=True) if p >= 0.5]
            out.append(result)
        return out
