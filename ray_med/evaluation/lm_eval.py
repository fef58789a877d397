"""Perplexity of any causal LM folder on any corpus file: the ``evaluate.py perplexity`` task.

The file is read with the named reader, its documents are tokenized with the model's
own tokenizer and packed into ``seq_len`` blocks exactly as pretraining packs them, and
:func:`~ray_med.evaluation.perplexity.lm_nll`, the function the in-training evaluation
uses, scores them.
"""

from __future__ import annotations

import json

import torch

from ray_med.data import pack, read_records, tokenize_texts
from ray_med.errors import DataError
from ray_med.evaluation.config import EvalOutputs, PerplexityEvalConfig
from ray_med.evaluation.perplexity import lm_nll
from ray_med.models import load_causal_lm, load_tokenizer


def perplexity_task(cfg: PerplexityEvalConfig) -> EvalOutputs:
    """Metrics of ``cfg.model`` on ``cfg.data``: perplexity, mean loss, tokens and sequences."""
    records = read_records(cfg.format, cfg.data, on_error="skip", options=cfg.options).records
    texts = [r.text for r in records if r.text]
    if not texts:
        raise DataError(f"{cfg.data}: no text records to evaluate (format {cfg.format})")
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model).eval()
    blocks = pack(tokenize_texts(tokenizer, texts), cfg.seq_len)
    if cfg.max_sequences is not None:
        blocks = blocks[: cfg.max_sequences]
    if not len(blocks):
        raise DataError(f"{cfg.data}: fewer than {cfg.seq_len} tokens in total; lower --seq-len")
    with torch.inference_mode():
        acc = lm_nll(lambda ids: model(input_ids=ids), blocks, batch_size=cfg.batch_size)
    out = EvalOutputs({
        "task": "perplexity",
        "model": cfg.model,
        "data": cfg.data,
        "format": cfg.format,
        "documents": len(texts),
        "sequences": int(len(blocks)),
        "seq_len": cfg.seq_len,
        "tokens": acc.tokens,
        "loss": acc.loss,
        "perplexity": acc.perplexity,
    })
    print(json.dumps(out.metrics))
    return out
