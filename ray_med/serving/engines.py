"""What the Serve deployments compute, as plain objects: no Ray, testable in process.

:class:`LMEngine` holds a causal LM and its LoRA adapters for QA, generation and chat;
:class:`ClassifierEngine` holds the stage-2 classifiers of ``jobs/finetune.py``. Both
load adapters on demand and drop them when told (the deployment's LRU decides when),
and both call the same functions as the offline evaluation job
(:mod:`ray_med.evaluation.qa`, :func:`ray_med.training.classify.predict`), which is
why ``evaluate.py`` and the endpoints give the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ray_med.adapters.host import AdapterHost, adapter_type
from ray_med.adapters.stacking import HEAD_CONFIG, HEAD_FILE, SequenceClassifier, check_adapter_dir
from ray_med.errors import DataError, ModelError
from ray_med.evaluation.qa import (
    QAConfig,
    QAItem,
    QAResult,
    chain_of_thought,
    fit_prompt,
    prompt_limit,
    select_shots,
)


def check_classifier_dir(path: str | Path) -> dict[str, Any]:
    """The ``classifier.json`` of a classifier folder, or a clear error."""
    meta_path = Path(path) / HEAD_CONFIG
    if not meta_path.is_file():
        raise ModelError(f"{path} is not a ray_med classifier folder (no {HEAD_CONFIG})")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{meta_path} is not valid JSON ({exc.msg})") from None


def device_and_dtype() -> tuple[str, torch.dtype | None]:
    """Serve on the GPU in bfloat16 when the replica has one, else on CPU in the folder's dtype."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", None


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads (0 leaves torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


class LMEngine:
    """A causal LM with its tokenizer and LoRA adapters: QA, generation and chat."""

    def __init__(self, model_path: str, adapters: dict[str, str], *, qa: QAConfig | None = None,
                 shots: Sequence[QAItem] = ()) -> None:
        from ray_med.models import load_causal_lm, load_tokenizer

        self.model_path = model_path
        self.adapters = dict(adapters)
        device, dtype = device_and_dtype()
        self.model = load_causal_lm(model_path, dtype=dtype).to(device).eval()
        self.tokenizer = load_tokenizer(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.qa = qa or QAConfig()
        self.shots = list(shots)
        self.host = AdapterHost(self.model)

    def load_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ModelError(f"unknown adapter {name!r}; this server has {sorted(self.adapters) or 'none'}")
        self.host.load(name, [self.adapters[name]])

    def unload_adapter(self, name: str) -> None:
        self.host.unload(name)

    def _use(self, adapter: str | None) -> Any:
        # In process, callers need not load first. Under Serve the multiplexed LRU has
        # already loaded it: a forward is queued on the compute thread before any unload
        # that evicts its adapter, so this is a no-op there.
        if adapter:
            self.load_adapter(adapter)
        return self.host.use(adapter)

    def qa_config(self, **request: Any) -> QAConfig:
        """The server's QA settings with a request's mode, n, temperature and seed applied."""
        return replace(self.qa, **{k: v for k, v in request.items() if v is not None})

    def qa_prompts(self, items: Sequence[QAItem], cfg: QAConfig) -> list[list[int]]:
        """Prompt ids (with the server's exemplars), checked against the model's context."""
        from ray_med.evaluation.qa import choice_token_ids

        if cfg.mode == "top_token":  # fail this request now, not the whole batch it would join
            for it in items:
                choice_token_ids(self.tokenizer, it.choices)
        limit = prompt_limit(self.model, cfg)
        return [fit_prompt(self.tokenizer, it, select_shots(self.shots, cfg.shots, cfg.seed, it), cfg.mode, limit)
                for it in items]

    def top_token(self, prompts: Sequence[list[int]], choices: Sequence[Sequence[str]],
                  adapter: str | None) -> list[QAResult]:
        from ray_med.evaluation.qa import top_token

        with self._use(adapter) as model:
            return top_token(model, self.tokenizer, prompts, choices)

    def chain_of_thought(self, prompt: list[int], choices: Sequence[str], cfg: QAConfig,
                         adapter: str | None) -> QAResult:
        with self._use(adapter) as model:
            return chain_of_thought(model, self.tokenizer, prompt, choices, cfg)

    def encode_prompt(self, text: str, max_new_tokens: int) -> list[int]:
        """Prompt ids, or a clear error when the prompt and the tokens to generate overflow the context."""
        from ray_med.evaluation.qa import PromptTooLong, context_length

        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        context = context_length(self.model)
        if len(ids) + max_new_tokens > context:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                                f"exceeds the model's {context}-token context")
        return ids

    def generate(self, prompt: list[int], *, max_new_tokens: int, temperature: float, seed: int,
                 adapter: str | None) -> str:
        from ray_med.evaluation.qa import generate

        with self._use(adapter) as model:
            return generate(model, self.tokenizer, prompt, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed)[0]

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

    def _folders(self, name: str) -> list[str] | None:
        """The LoRA folders of a classifier, or None if it cannot share a base (full, non-LoRA)."""
        meta, path = self.meta[name], self.paths[name]
        if meta.get("setting") == "full":
            return None
        folders = [meta["domain_adapter"]] if meta.get("domain_adapter") else []
        if meta.get("downstream"):
            folders.append(path)
        for folder in folders:
            check_adapter_dir(folder)
        return folders if all(adapter_type(f) == "LORA" for f in folders) else None

    def load(self, name: str) -> None:
        from safetensors.torch import load_file

        from ray_med.adapters.stacking import load_classifier
        from ray_med.models import load_base_model, load_tokenizer

        if name in self._loaded:
            return
        if name not in self.paths:
            raise ModelError(f"unknown classifier {name!r}; this server has {sorted(self.paths) or 'none'}")
        meta, path = self.meta[name], self.paths[name]
        folders = self._folders(name)
        if folders is None:  # its own copy of the body
            model, _ = load_classifier(path)
            model = model.to(device_and_dtype()[0])
            tok = load_tokenizer(str(Path(path) / "model") if meta.get("setting") == "full" else meta["base_model"])
            self._loaded[name] = _Loaded(model, None, tok, meta)
            return
        base_path = meta["base_model"]
        if base_path not in self._bases:
            device, dtype = device_and_dtype()
            base = load_base_model(base_path, dtype=dtype).to(device).eval()
            self._bases[base_path] = (AdapterHost(base), load_tokenizer(base_path))
        host, tok = self._bases[base_path]
        host.load(name, folders)
        model = SequenceClassifier(host.model, host.model.config.hidden_size, meta["num_labels"], meta["pooling"])
        model.head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        model.head.to(next(host.model.parameters()).device)
        self._loaded[name] = _Loaded(model.eval(), host, tok, meta)

    def unload(self, name: str) -> None:
        entry = self._loaded.pop(name, None)
        if entry is not None and entry.host is not None:
            entry.host.unload(name)

    def labels(self, name: str) -> list[str]:
        meta = self.meta[name]
        return meta.get("labels") or [str(i) for i in range(meta["num_labels"])]

    def classify(self, name: str, texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> list[dict]:
        """Label and probabilities for each text (and second segment), as the evaluate job scores them."""
        from ray_med.training.classify import encode_texts, predict

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
