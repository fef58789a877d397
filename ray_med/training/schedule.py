"""Learning-rate schedule and FLOP accounting for training (pure maths).

The pretraining schedule is Meditron's: linear warmup, then cosine decay to ``min_lr_ratio`` of
the peak (10%) at ``max_steps``. Warmup is counted in optimizer steps.

Training FLOPs per token follow the PaLM appendix B accounting: 6 per trainable
parameter (forward 2, backward 4: the gradient of the activations and of the weight)
plus the attention score and value products, 12 · layers · hidden · seq_len. A frozen
parameter (an adapter's base model) costs 4: the forward and the activations'
gradient, which the backward pass still needs to reach the adapters below it, but no
weight gradient. MFU is achieved FLOP/s over the hardware's peak.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak * min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def warmup_linear(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier of the adapter and classifier fits: linear warmup, then linear decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int, *, n_frozen: int = 0) -> float:
    """Training FLOPs per token: 6·N_trainable + 4·N_frozen + 12·L·H·S (PaLM, appendix B).

    ``n_params`` counts the trainable matmul weights, ``n_frozen`` the frozen ones (the
    base under an adapter). 4 per frozen weight assumes the activations' gradient flows
    through every frozen layer, true when adapters sit in every layer or at the input
    (LoRA, prefix, prompt); it is an upper bound when only the top is trained.
    """
    return 6.0 * n_params + 4.0 * n_frozen + 12.0 * n_layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak."""
    return tokens_per_s * flops_token / peak_flops if peak_flops > 0 else 0.0
