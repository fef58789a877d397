"""The injected model: an LLM reading the federated encoders' vectors as tokens, with its adapter; saved and loaded. No Ray.

Like the multimodal model's ``<image>`` token (LLaVA), each modality has a placeholder
token (``<image>``, ``<table>``, ``<note>``, ``<signal>``) that a prompt repeats
``n_tokens`` times; the input embeddings at those positions are replaced by the
modality's projector output: the frozen federated encoder's vector, mapped to
``n_tokens`` LLM embeddings by a two-layer MLP. The LLM's own embeddings, encoders and
weights stay frozen; the projectors and the adapter train.

The adapter is one of:

* ``M3OE`` (:mod:`ray_med.adapters.m3oe`): its gate is computed per sample from the
  modality text and the task text, embedded with the LLM's input embeddings;
* a PEFT LoRA (FedPlugL, or a folded M3OE task): the LLM is a ``PeftModel``;
* none (FedPlug).

Folder format (``<output_dir>/model``), read by :func:`load_injected`:

* ``injected_config.json``: ``format`` (``ray_med.injected/1``), ``hidden_size``,
  ``modalities`` (placeholder token and id, ``n_tokens``, the encoder's ``dim``, the
  modality text) and ``tasks`` (description, question, answer words, label names, seen);
* ``llm/``: the plain causal LM and its tokenizer (placeholders included), loadable by
  ``AutoModelForCausalLM``;
* ``encoders/<modality>/``: the federated encoders as the federated job saved them;
* ``projectors.safetensors``: ``<modality>.<parameter>``.

The adapter lives beside it (``<output_dir>/adapter``): an M3OE folder or a PEFT LoRA.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ray_med.errors import ConfigError, DataError, ModelError

FORMAT = "ray_med.injected/1"
CONFIG_FILE = "injected_config.json"
PLACEHOLDERS = {"image": "<image>", "tabular": "<table>", "text": "<note>", "signal": "<signal>"}


@dataclass
class TaskSpec:
    """A task as the model knows it: texts, answer words and the labels of its data."""

    name: str
    modality: str
    description: str
    question: str
    answers: dict[str, str]
    labels: list[str] = field(default_factory=list)
    """The modality data's label names, in label-index order."""
    seen: bool = True

    @property
    def options(self) -> list[str]:
        """The answer words, in the order the labels first give them."""
        out: list[str] = []
        for lab in self.labels or list(self.answers):
            word = self.answers[lab]
            if word not in out:
                out.append(word)
        return out

    def gold(self, label_index: int) -> int:
        """The option index of a label index."""
        return self.options.index(self.answers[self.labels[label_index]])

    def check_labels(self) -> None:
        missing = [lab for lab in self.labels if lab not in self.answers]
        if missing:
            raise ConfigError(f"task {self.name}: answers give no word for the labels {missing} of its data "
                              f"(labels: {self.labels})")


def prompt_text(task: TaskSpec, n_tokens: int) -> str:
    """The prompt every method reads; the answer word follows "Answer:"."""
    return (f"Task: {task.description}\nInput: {PLACEHOLDERS[task.modality] * n_tokens}\n"
            f"Question: {task.question}\nAnswer:")


def add_placeholders(tokenizer: Any, modalities: list[str]) -> dict[str, int]:
    """Give the tokenizer each modality's placeholder (once); return their ids."""
    new = [PLACEHOLDERS[m] for m in modalities if PLACEHOLDERS[m] not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return {m: tokenizer.convert_tokens_to_ids(PLACEHOLDERS[m]) for m in modalities}


class Projector(nn.Module):
    """An encoder vector -> ``n_tokens`` LLM input embeddings (LLaVA's two-layer MLP, widened to n tokens)."""

    def __init__(self, dim: int, hidden: int, n_tokens: int) -> None:
        super().__init__()
        self.n_tokens, self.hidden = n_tokens, hidden
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_tokens * hidden))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v).view(v.shape[0], self.n_tokens, self.hidden)


class InjectedModel(nn.Module):
    """LLM + frozen federated encoders + one projector per modality (+ the adapter, attached by the caller)."""

    def __init__(self, llm: nn.Module, encoders: dict[str, nn.Module], token_ids: dict[str, int], n_tokens: int,
                 modality_texts: dict[str, str]) -> None:
        super().__init__()
        self.llm = llm
        self.encoders = nn.ModuleDict(encoders)
        self.encoders.requires_grad_(False)
        self.encoders.eval()
        hidden = llm.get_input_embeddings().embedding_dim
        self.hidden, self.n_tokens = hidden, n_tokens
        self.token_ids = dict(token_ids)
        self.modality_texts = dict(modality_texts)
        self.projectors = nn.ModuleDict({m: Projector(e.spec.dim, hidden, n_tokens) for m, e in encoders.items()})
        self.m3oe: Any = None
        """The M3OE adapter (its router is a submodule; its experts live inside the LLM's layers)."""

    def train(self, mode: bool = True) -> InjectedModel:
        super().train(mode)
        self.encoders.eval()  # frozen: their dropout and norms stay in inference mode
        return self

    def attach_m3oe(self, adapter: nn.Module) -> None:
        self.m3oe = adapter

    def embed(self, input_ids: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input embeddings with every placeholder run replaced by its item's projected encoder vector."""
        emb = self.llm.get_input_embeddings()(input_ids)
        for mod, x in inputs.items():
            with torch.no_grad():
                v = self.encoders[mod].embed(x)
            tokens = self.projectors[mod](v.float()).to(emb.dtype)
            where = input_ids == self.token_ids[mod]
            if int(where.sum()) != tokens.shape[0] * self.n_tokens:
                raise DataError(f"{mod}: {int(where.sum())} placeholder tokens in the batch for "
                                f"{tokens.shape[0]} inputs of {self.n_tokens} tokens each (was the prompt cut?)")
            emb = emb.masked_scatter(where.unsqueeze(-1), tokens)
        return emb

    def gate(self, gate_text: dict[str, torch.Tensor]) -> Any:
        """M3OE's gate output for the batch's (modality text, task text) pairs."""
        return self.m3oe.compute_gate(self.llm.get_input_embeddings(), gate_text["modality_ids"],
                                      gate_text["modality_mask"], gate_text["task_ids"], gate_text["task_mask"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, torch.Tensor],
                gate_text: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, Any]:
        """(logits, gate output or None)."""
        emb = self.embed(input_ids, inputs)
        if self.m3oe is None:
            return self.llm(inputs_embeds=emb, attention_mask=attention_mask).logits, None
        if gate_text is None:
            raise ModelError("an M3OE model needs each item's modality and task text")
        out = self.gate(gate_text)
        with self.m3oe.gate_context(out.weights):
            logits = self.llm(inputs_embeds=emb, attention_mask=attention_mask).logits
        return logits, out


# ----------------------------------------------------------------------------------- encoding and batches


@dataclass
class Item:
    """One example encoded for the model."""

    task: str
    modality: str
    input_ids: list[int]
    choice_ids: list[int]
    gold: int
    """Option index of the answer."""
    x: np.ndarray
    """The encoder's input (one row)."""
    modality_ids: list[int]
    task_ids: list[int]
    id: str = ""


class Encoder:
    """Tasks' prompts and gate texts as token ids, computed once per task."""

    def __init__(self, tokenizer: Any, tasks: dict[str, TaskSpec], modality_texts: dict[str, str],
                 n_tokens: int) -> None:
        from ray_med.evaluation.qa import choice_token_ids  # lazy: qa imports transformers' stopping criteria

        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prompt = {n: tokenizer(prompt_text(t, n_tokens), add_special_tokens=False)["input_ids"]
                       for n, t in tasks.items()}
        self.choices = {n: choice_token_ids(tokenizer, t.options) for n, t in tasks.items()}
        self.task_text = {n: tokenizer(t.description, add_special_tokens=False)["input_ids"] for n, t in tasks.items()}
        self.modality_text = {m: tokenizer(text, add_special_tokens=False)["input_ids"]
                              for m, text in modality_texts.items()}
        self.tasks = tasks

    def item(self, task: str, x: np.ndarray, label_index: int, item_id: str = "") -> Item:
        t = self.tasks[task]
        return Item(task, t.modality, self.prompt[task], self.choices[task], t.gold(label_index), x,
                    self.modality_text[t.modality], self.task_text[task], item_id)


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def collate(items: list[Item], pad: int) -> dict[str, Any]:
    """Right-padded prompts, each modality's inputs (in batch order), the gate texts, the answer tokens."""
    ids, mask = _pad([it.input_ids for it in items], pad)
    inputs = {m: torch.from_numpy(np.stack([it.x for it in items if it.modality == m]))
              for m in dict.fromkeys(it.modality for it in items)}
    mod_ids, mod_mask = _pad([it.modality_ids for it in items], pad)
    task_ids, task_mask = _pad([it.task_ids for it in items], pad)
    return {"input_ids": ids, "attention_mask": mask, "inputs": inputs,
            "gate_text": {"modality_ids": mod_ids, "modality_mask": mod_mask, "task_ids": task_ids,
                          "task_mask": task_mask},
            "last": mask.sum(1) - 1, "gold_token": torch.tensor([it.choice_ids[it.gold] for it in items]),
            "tasks": [it.task for it in items]}


def to_device(b: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(b)
    for k in ("input_ids", "attention_mask", "last", "gold_token"):
        out[k] = b[k].to(device)
    out["inputs"] = {m: x.to(device) for m, x in b["inputs"].items()}
    out["gate_text"] = {k: v.to(device) for k, v in b["gate_text"].items()}
    return out


def last_logits(model: InjectedModel, b: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """(logits at each item's last prompt position (B, V), gate output or None)."""
    logits, gate = model(b["input_ids"], b["attention_mask"], b["inputs"], b["gate_text"])
    return logits[torch.arange(logits.shape[0], device=logits.device), b["last"]].float(), gate


@torch.no_grad()
def choice_probs(model: InjectedModel, items: list[Item], pad: int, *, batch_size: int = 32,
                 stats: Any = None) -> np.ndarray:
    """(n, k) probabilities over each item's answer words (top token over the options, renormalised)."""
    was = model.training
    model.eval()
    device = next(model.llm.parameters()).device
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        b = to_device(collate(chunk, pad), device)
        rows, gate = last_logits(model, b)
        if stats is not None and gate is not None:
            for task in dict.fromkeys(b["tasks"]):
                keep = torch.tensor([t == task for t in b["tasks"]], device=gate.probs.device)
                stats.update(task, type(gate)(weights=gate.weights[keep], probs=gate.probs[keep]))
        ids = torch.tensor([it.choice_ids for it in chunk], device=rows.device)
        out.append(torch.softmax(rows.gather(1, ids), dim=-1).cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, 0))


# ----------------------------------------------------------------------------------- save and load


def save_injected(model: InjectedModel, out_dir: str | Path, *, llm_dir: str | Path, encoder_dirs: dict[str, str],
                  tasks: dict[str, TaskSpec], method: str) -> Path:
    """Write the injected model's folder (see the module docstring); ``llm_dir`` holds the plain LLM + tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(llm_dir, out / "llm", dirs_exist_ok=True)
    for mod, src in encoder_dirs.items():
        shutil.copytree(src, out / "encoders" / mod, dirs_exist_ok=True)
    save_file({f"{m}.{k}": v.detach().float().contiguous().cpu() for m, p in model.projectors.items()
               for k, v in p.state_dict().items()}, str(out / "projectors.safetensors"))
    cfg = {"format": FORMAT, "method": method, "hidden_size": model.hidden, "n_tokens": model.n_tokens,
           "modalities": {m: {"token": PLACEHOLDERS[m], "token_id": model.token_ids[m],
                              "dim": int(model.encoders[m].spec.dim), "text": model.modality_texts.get(m, "")}
                          for m in model.encoders},
           "tasks": {n: asdict(t) for n, t in tasks.items()}}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def is_injected_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_injected_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise ModelError(f"{path}: not an injected model folder (no {CONFIG_FILE})")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{f} is not valid JSON ({exc.msg})") from None
    if cfg.get("format") != FORMAT:
        raise ModelError(f"{f}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def load_projectors(model: InjectedModel, path: str | Path) -> None:
    """Projector weights from a ``projectors.safetensors`` (strict)."""
    state = load_file(str(path))
    for m, p in model.projectors.items():
        part = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == m}
        try:
            p.load_state_dict(part, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{path}: the {m} projector does not fit ({str(exc).splitlines()[0]})") from None


def load_injected(path: str | Path, adapter: str | Path | None = None, *, trainable: bool = False
                  ) -> tuple[InjectedModel, Any, dict[str, TaskSpec]]:
    """(model in eval mode, tokenizer, tasks) of an injected model folder, with an M3OE or LoRA adapter if given."""
    from ray_med.adapters.registry import method_of_folder  # lazy: the registry imports every adapter method
    from ray_med.federated.models import load_modality  # lazy: as above (transformers for the text encoders)
    from ray_med.models.loading import load_causal_lm, load_tokenizer  # lazy: as above

    cfg = read_injected_config(path)
    root = Path(path)
    llm = load_causal_lm(root / "llm")
    tokenizer = load_tokenizer(root / "llm")
    encoders = {m: load_modality(root / "encoders" / m) for m in cfg["modalities"]}
    token_ids = {m: int(v["token_id"]) for m, v in cfg["modalities"].items()}
    texts = {m: v["text"] for m, v in cfg["modalities"].items()}
    if adapter is not None:
        method = method_of_folder(adapter)
        if method is None:
            raise ModelError(f"{adapter}: an adapter type ray_med cannot put on an injected model")
        if method.name == "m3oe":
            m3oe = method.load(llm, adapter, trainable=trainable)
            model = InjectedModel(llm, encoders, token_ids, int(cfg["n_tokens"]), texts)
            model.attach_m3oe(m3oe)
        else:
            llm = method.load(llm, adapter, trainable=trainable)
            model = InjectedModel(llm, encoders, token_ids, int(cfg["n_tokens"]), texts)
    else:
        model = InjectedModel(llm, encoders, token_ids, int(cfg["n_tokens"]), texts)
    load_projectors(model, root / "projectors.safetensors")
    tasks = {n: TaskSpec(**t) for n, t in cfg["tasks"].items()}
    return model.eval(), tokenizer, tasks


def fold_task(model: InjectedModel, tokenizer: Any, task: TaskSpec, out_dir: str | Path) -> Path:
    """An M3OE model's adapter for one (task, modality), as a plain PEFT LoRA folder (exact)."""
    if model.m3oe is None:
        raise ModelError("only an M3OE model folds into a LoRA")
    enc = Encoder(tokenizer, {task.name: task}, model.modality_texts, model.n_tokens)
    mod, txt = enc.modality_text[task.modality], enc.task_text[task.name]
    b = {"modality_ids": torch.tensor([mod]), "modality_mask": torch.ones(1, len(mod), dtype=torch.long),
         "task_ids": torch.tensor([txt]), "task_mask": torch.ones(1, len(txt), dtype=torch.long)}
    device = next(model.llm.parameters()).device
    with torch.no_grad():
        g = model.gate({k: v.to(device) for k, v in b.items()}).weights[0]
    model.m3oe.fold_to_lora(g, out_dir)
    return Path(out_dir)
