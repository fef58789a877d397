"""The classifier folder: how a stage-2 classifier is saved, checked and loaded. Training, evaluation and serving all use it.

A classifier folder (``<output_dir>/adapter`` of ``jobs/finetune.py stage=downstream``) holds:

* ``classifier.json``: the base model's folder, the labels, the task type, the pooling,
  the setting (``head_only``, ``adapter`` or ``full``), the stage-1 adapter's folder and the
  downstream adapter's method;
* ``classifier_head.safetensors``: the linear head;
* the downstream adapter at the root in PEFT layout (``adapter_config.json`` +
  ``adapter_model.safetensors``), when there is one;
* ``domain/``: the stage-1 adapter, when it was trained further (``domain_trainable``);
* ``model/``: the whole body, for full fine-tuning and merged exports.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ray_med.adapters.registry import check_adapter_dir, get_method, method_of_folder
from ray_med.adapters.stacking import DOMAIN, DOWNSTREAM, ClassifierSpec, SequenceClassifier
from ray_med.errors import ModelError
from ray_med.models import load_base_model, save_pretrained

HEAD_FILE, HEAD_CONFIG = "classifier_head.safetensors", "classifier.json"


def check_classifier_dir(path: str | Path) -> dict[str, Any]:
    """The ``classifier.json`` of a classifier folder, or a clear error."""
    meta_path = Path(path) / HEAD_CONFIG
    if not meta_path.is_file():
        raise ModelError(f"{path} is not a ray_med classifier folder (no {HEAD_CONFIG})")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{meta_path} is not valid JSON ({exc.msg})") from None


def domain_folder(path: str | Path, meta: dict[str, Any]) -> str | None:
    """The stage-1 adapter of a classifier: recorded relative to the folder when it was trained with it."""
    value = meta.get("domain_adapter")
    if not value:
        return None
    if "://" in value or Path(value).is_absolute():
        return value
    return str(Path(path) / value)


def localize_classifier(path: str, localize: Callable[[str], str], cache: Path) -> str:
    """A local classifier folder whose recorded base model and stage-1 adapter are local folders too.

    ``localize`` turns a storage URI into a local copy (``ray_med.runtime.localize``); the
    folder itself and every URI its ``classifier.json`` records go through it, and the
    local copy's ``classifier.json`` is rewritten to point at theirs. A local folder that
    records URIs is copied into ``cache`` first: a user's folder is never rewritten.
    """
    local = localize(path)
    meta = check_classifier_dir(local)
    remote = {k: meta[k] for k in ("base_model", "domain_adapter") if meta.get(k) and "://" in meta[k]}
    if not remote:
        return local
    if local == path:
        key = hashlib.sha256(f"{Path(path).resolve()}\n{json.dumps(meta, sort_keys=True)}".encode()).hexdigest()[:16]
        copy_dir = cache / key / Path(path).name
        if not copy_dir.exists():
            tmp = cache / f"{key}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copytree(path, tmp / Path(path).name)
            try:
                tmp.rename(cache / key)
            except OSError:  # another process made the same copy
                shutil.rmtree(tmp, ignore_errors=True)
        local = str(copy_dir)
    meta.update({k: localize(v) for k, v in remote.items()})
    target = Path(local) / HEAD_CONFIG
    tmp_file = target.with_name(f"{HEAD_CONFIG}.tmp-{uuid.uuid4().hex[:8]}")
    tmp_file.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_file, target)  # replicas on one machine may rewrite the same copy at once
    return local


def labels_of(meta: dict[str, Any]) -> list[str]:
    """The label names of a classifier (indices as strings when it was saved without names)."""
    return meta.get("labels") or [str(i) for i in range(meta["num_labels"])]


def adapter_folders(path: str | Path, meta: dict[str, Any]) -> list[str]:
    """The adapter folders of a classifier, stage 1 first, each checked."""
    domain = domain_folder(path, meta)
    folders = [domain] if domain else []
    if meta.get("downstream"):
        folders.append(str(path))
    for folder in folders:
        check_adapter_dir(folder)
    return folders


def shares_base(path: str | Path, meta: dict[str, Any]) -> bool:
    """Whether a serving replica can run this classifier on a base shared with others (LoRA adapters only)."""
    if meta.get("setting") == "full":
        return False
    methods = [method_of_folder(f) for f in adapter_folders(path, meta)]
    return all(m is not None and m.host == "shared" for m in methods)


def save_classifier(
    model: SequenceClassifier, spec: ClassifierSpec, out_dir: str | Path, base_path: str, *, write_body: bool = True
) -> Path:
    """Write the downstream adapter (PEFT format), the head and its description to ``out_dir``.

    A trainable domain adapter is written too, to ``out_dir/domain`` (recorded as
    ``domain``, relative to the folder, so the folder can move: to a bucket, to a cache).
    Full fine-tuning writes the whole body with ``save_pretrained`` instead. ``base_path``
    and ``spec.domain_adapter`` are recorded as given: where the folder's reader finds
    them (a storage URI stays a URI), not where this process loaded them from.
    Write into a folder from ``Storage.local_dir`` so a failed save leaves nothing behind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = model.body
    if spec.setting == "full":
        if write_body:
            body.save_pretrained(str(out / "model"))
    elif hasattr(body, "save_pretrained") and hasattr(body, "peft_config"):
        if DOWNSTREAM in body.peft_config:
            body.save_pretrained(str(out), selected_adapters=[DOWNSTREAM])
        if spec.domain_adapter and spec.domain_trainable:
            body.save_pretrained(str(out / "domain_tmp"), selected_adapters=[DOMAIN])
            # PEFT writes non-default adapters into a subfolder named after them.
            shutil.move(out / "domain_tmp" / DOMAIN, out / "domain")
            shutil.rmtree(out / "domain_tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(out / HEAD_FILE))
    meta = {
        "base_model": base_path,
        "num_labels": spec.num_labels,
        "labels": spec.labels,
        "task_type": spec.task_type,
        "pooling": spec.pooling,
        "setting": spec.setting,
        "domain_adapter": ("domain" if spec.domain_trainable else spec.domain_adapter)
        if spec.domain_adapter else None,
        "downstream": spec.downstream.method if (spec.downstream and spec.setting == "adapter") else None,
    }
    (out / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def merge_classifier(model: SequenceClassifier, spec: ClassifierSpec, out_dir: str | Path, tokenizer: Any, *,
                     final_dir: str | None = None) -> Path:
    """Merge every active LoRA adapter into the base weights; write an HF folder + head.

    The result is a plain transformers model (``<out_dir>/model``) that serves without
    PEFT; the unmerged adapters stay in ``<output_dir>/adapter`` for multi-adapter serving.
    ``final_dir``: where ``out_dir`` ends up (a temporary folder is renamed or uploaded
    there), recorded as the base model's location.
    """
    body = copy.deepcopy(model.body)
    if hasattr(body, "merge_and_unload"):
        body = body.merge_and_unload()
    merged = SequenceClassifier(body, body.config.hidden_size, spec.num_labels, spec.pooling)
    merged.head.load_state_dict(model.head.state_dict())
    out = Path(out_dir)
    save_pretrained(body, out / "model", tokenizer=tokenizer)
    full = ClassifierSpec(num_labels=spec.num_labels, task_type=spec.task_type, pooling=spec.pooling,
                          setting="full", downstream=None, labels=spec.labels)
    return save_classifier(merged, full, out, f"{final_dir or out}/model", write_body=False)


def load_head(model: SequenceClassifier, path: str | Path) -> SequenceClassifier:
    """``model`` with the head saved in the classifier folder ``path``."""
    model.head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
    return model


def load_classifier(adapter_dir: str | Path, *, base_path: str | None = None) -> tuple[SequenceClassifier, dict]:
    """A saved stage-2 classifier: base + stage-1 adapter + downstream adapter + head, all active.

    ``base_path`` overrides the base recorded in ``classifier.json`` (e.g. the same model
    at another path on a serving node).
    """
    out = Path(adapter_dir)
    meta = check_classifier_dir(out)
    base_path = base_path or meta["base_model"]
    if meta["setting"] == "full":
        body: nn.Module = load_base_model(str(out / "model"))
    else:
        body = load_base_model(base_path)
        active = []
        domain = domain_folder(out, meta)
        if domain:
            method = method_of_folder(domain)
            if method is None:
                raise ModelError(f"{domain}: an adapter type ray_med does not know")
            body = method.load(body, domain, adapter_name=DOMAIN)
            active.append(DOMAIN)
        if meta.get("downstream"):
            body = get_method(meta["downstream"]).load(body, out, adapter_name=DOWNSTREAM)
            active.append(DOWNSTREAM)
        if len(active) > 1:
            body.base_model.set_adapter(active)
    model = SequenceClassifier(body, body.config.hidden_size, meta["num_labels"], meta["pooling"])
    return load_head(model, out).eval(), meta
