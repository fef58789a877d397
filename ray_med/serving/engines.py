"""What the Serve deployments compute, as plain objects: no Ray, testable in process.

:class:`LMEngine` holds a causal LM and its LoRA adapters for QA, generation and chat;
:class:`ClassifierEngine` holds the stage-2 classifiers of ``jobs/finetune.py``. Both
load adapters on demand and drop them when told (the deployment's LRU decides when),
and both call the same functions as the offline evaluation job
(:mod:`ray_med.evaluation.qa`, :mod:`ray_med.evaluation.classify`), which is why
``evaluate.py`` and the endpoints give the same answers.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
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
from ray_med.errors import DataError, ModelError
from ray_med.evaluation.classify import encode_texts, predict
from ray_med.evaluation.config import QAConfig
from ray_med.evaluation.qa import (
    QAResult,
    chain_of_thought,
    choice_token_ids,
    context_length,
    generate,
    prompt_limit,
    top_token,
)
from ray_med.models import inference_device, load_base_model, load_tokenizer
from ray_med.tasks.prompts import PromptTooLong, QAItem, fit_prompt, select_shots


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
    """A generated text and its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int


class LMEngine:
    """A causal LM with its tokenizer and LoRA adapters: QA, generation and chat."""

    def __init__(self, model_path: str, adapters: dict[str, str], *, qa: QAConfig | None = None,
                 shots: Sequence[QAItem] = ()) -> None:
        self.model_path = model_path
        self.lm = load_lm(model_path, adapters)
        self.model, self.tokenizer, self.host = self.lm.model, self.lm.tokenizer, self.lm.host
        self.qa = qa or QAConfig()
        self.shots = list(shots)

    @property
    def adapters(self) -> dict[str, str]:
        return self.lm.adapters

    def load_adapter(self, name: str) -> None:
        self.lm.load_adapter(name)

    def unload_adapter(self, name: str) -> None:
        self.lm.unload_adapter(name)

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

    def chain_of_thought(self, prompt: list[int], choices: Sequence[str], cfg: QAConfig, adapter: str | None, *,
                         seed: int | None = None, cancel: threading.Event | None = None) -> QAResult:
        """cot or sc_cot; sc_cot samples with ``seed`` (None: a random one), and stops early once ``cancel`` is set.

        ``cfg.seed`` chose the prompt's exemplars; the sampling seed is the request's own.
        """
        cfg = replace(cfg, seed=sampling_seed(seed))
        with self.lm.use(adapter) as model:
            return chain_of_thought(model, self.tokenizer, prompt, choices, cfg, stopping_criteria=_stops(cancel))

    def encode_prompt(self, text: str, max_new_tokens: int) -> list[int]:
        """Prompt ids, or a clear error when the prompt and the tokens to generate overflow the context."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        context = context_length(self.model)
        if len(ids) + max_new_tokens > context:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                                f"exceeds the model's {context}-token context")
        return ids

    def generate(self, prompt: list[int], *, max_new_tokens: int, temperature: float, seed: int | None,
                 adapter: str | None, cancel: threading.Event | None = None) -> str:
        """One continuation; sampled with ``seed`` (None: a random one) when ``temperature`` > 0.

        Generation checks ``cancel`` between tokens and stops once it is set, so a
        cancelled or timed-out request frees the model within one token.
        """
        with self.lm.use(adapter) as model:
            return generate(model, self.tokenizer, prompt, temperature=temperature, max_new_tokens=max_new_tokens,
                            seed=sampling_seed(seed), stopping_criteria=_stops(cancel))[0]

    def complete(self, text: str, *, max_new_tokens: int, temperature: float, seed: int | None,
                 adapter: str | None, cancel: threading.Event | None = None) -> Generation:
        """Encode, check, generate and count: one generation request."""
        ids = self.encode_prompt(text, max_new_tokens)
        out = self.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, adapter=adapter,
                            cancel=cancel)
        return Generation(out, len(ids), len(self.tokenizer(out, add_special_tokens=False)["input_ids"]))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The tokenizer's chat template when it has one, else plain "role: content" turns."""
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # templates raise on e.g. roles out of order  # noqa: BLE001
                raise DataError(f"the model's chat template refused these messages: {exc}") from None
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(turns) + "\nAssistant:"


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
