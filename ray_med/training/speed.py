"""What makes a training step cheaper without changing its maths: per-layer torch.compile and the fused LM loss.

* :func:`compile_layers` compiles every transformer block of a model *in place*
  (``nn.Module.compile``): the module tree, its parameter names and its state dict are
  unchanged, so the DeepSpeed engine, PEFT, checkpoints and the HF export still see the
  model they built. The blocks of one model share their code, so torch compiles one
  block (and its backward) once, not the whole model: the first step pays seconds, not minutes.
* :func:`fuse_lm_loss` makes a causal LM compute its training loss from the last hidden
  states without materialising the ``batch x seq x vocab`` fp32 logits (for Llama-1B at
  seq 2048 and a micro-batch of 8: 2 GB per micro-batch, and as much again for their
  gradient). On a GPU with the ``gpu`` extra it is Liger's fused Triton kernel
  (``liger-kernel``, which needs Triton and so CUDA: it is imported only there);
  everywhere else :func:`linear_cross_entropy`, plain torch over chunks of tokens. Both
  give HF's loss (mean over the tokens that have a next token) and its gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ray_med.errors import ConfigError

IGNORE_INDEX = -100
"""The label HF's loss skips (the position after the last token)."""

COMPILE_OPTIONS: dict[str, Any] = {}
"""``torch.compile`` options of ``train.compile`` (none: the inductor backend, default mode)."""

CHUNK_BYTES = 256 * 2**20
"""The fp32 logits one chunk of :func:`linear_cross_entropy` may hold (its tokens: this over 4 x vocab)."""


def liger_available() -> bool:
    """True when Liger's kernels can run here: a CUDA device, and liger-kernel (with Triton) installed."""
    if not torch.cuda.is_available():
        return False
    try:
        # lazy: liger-kernel is the optional gpu extra and imports Triton, which needs CUDA
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_fused_loss(setting: bool | str, *, on_gpu: bool) -> str | None:
    """``train.fused_loss`` as the loss a worker runs: None (HF's), "chunked" or "liger".

    ``true``/``auto`` take Liger on a GPU where it is installed, else the chunked loss;
    ``liger`` where it cannot run is a user error, said before any step.
    """
    if setting is False:
        return None
    if setting in (True, "auto"):
        return "liger" if on_gpu and liger_available() else "chunked"
    if setting == "liger" and not (on_gpu and liger_available()):
        raise ConfigError("train.fused_loss=liger needs a CUDA GPU and the gpu extra (pip install -e '.[gpu]'); "
                          "use auto or chunked")
    return str(setting)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T`` chunk by chunk; the gradients are made in the forward.

    Each chunk's logits live only while its loss and its two gradient products are
    computed (as Liger does in Triton), so the peak is one chunk's logits, not the
    batch's, and no recomputation is needed in the backward.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, divisor: float,
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulation across chunks, as a matmul over the whole batch would do it.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.t()).float()  # HF's loss upcasts the logits too
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if not (need_h or need_w):
                continue
            # d loss / d logits = (softmax - one_hot) / divisor, in place of the logits.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), safe] -= 1.0
            grad *= (valid.float() / divisor)[:, None]
            grad = grad.to(hidden.dtype)
            if need_h:
                grad_h[start : start + chunk] = grad @ weight
            if need_w:
                grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         num_items: int | torch.Tensor | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (N, H) @ weight (V, H).T`` against ``targets (N,)`` (-100 skipped).

    ``num_items`` divides the summed loss instead of the count of kept targets (HF's
    ``num_items_in_batch``). ``chunk_tokens`` defaults to what keeps a chunk's fp32
    logits under :data:`CHUNK_BYTES`.
    """
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    divisor = float(num_items) if num_items is not None else float(max(int((targets != IGNORE_INDEX).sum()), 1))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, divisor, chunk)


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    # lazy: the gpu extra; resolve_fused_loss checked that it imports here
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if num_items is None:
        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(weight, hidden, targets)
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(weight, hidden, targets) / num_items


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM inside ``model`` (itself, or under PEFT or an adapter): the module with ``model`` and ``lm_head``."""
    for module in model.modules():
        if isinstance(module._modules.get("lm_head"), torch.nn.Module) and "model" in module._modules:
            return module
    raise ConfigError(f"train.fused_loss: {type(model).__name__} has no lm_head over a base model to fuse")


def fuse_lm_loss(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Make ``model``'s causal LM compute its training loss with ``kind`` ("chunked" or "liger"); returns the LM.

    Only the LM's own ``forward`` is replaced (an attribute of that instance), so PEFT,
    the adapters and DeepSpeed call it as before. A call with ``labels`` while autograd
    records runs the base model, then the fused loss on its last hidden states, and
    returns the loss without logits; every other call (evaluation, generation) is HF's.
    """
    lm = causal_lm(model)
    head, config = lm.lm_head, lm.config
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ConfigError(f"train.fused_loss: the lm_head of {type(lm).__name__} is not a bias-free Linear")
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise ConfigError(f"train.fused_loss: {type(lm).__name__} scales its logits, which the fused loss does not")
    plain = lm.forward
    loss_fn: Callable[..., torch.Tensor] = _liger_loss if kind == "liger" else linear_cross_entropy

    def forward(*args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if args or labels is None or not torch.is_grad_enabled():
            return plain(*args, **kwargs)
        # lazy: transformers loads with the model anyway; this module stays importable without it
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        out = lm.model(**kwargs)
        hidden = out.last_hidden_state
        # HF's shift: position i predicts token i + 1; the last position predicts nothing.
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
        loss = loss_fn(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), num_items=num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    lm.forward = forward
    return lm


def compile_layers(model: torch.nn.Module, **options: Any) -> int:
    """``torch.compile`` every transformer block of ``model`` in place; returns how many.

    The blocks are the classes HF lists in ``_no_split_modules`` (LlamaDecoderLayer,
    BertLayer; never the embeddings). ``options`` (over :data:`COMPILE_OPTIONS`) go to ``torch.compile``.
    """
    blocks: set[str] = set()
    for module in model.modules():
        names = getattr(type(module), "_no_split_modules", None) or ()
        blocks.update(n for n in names if "Embedding" not in n)
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ConfigError(f"train.compile: found no transformer blocks to compile in {type(model).__name__}")
    for layer in layers:
        layer.compile(**{**COMPILE_OPTIONS, **options})
    return len(layers)
