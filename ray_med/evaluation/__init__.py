"""Evaluation: metrics, perplexity, classifier inference and the QA inference modes, and the ``evaluate`` job's tasks.

Core (no Ray, no DeepSpeed): the offline evaluation job, the in-training evaluation and
the serving engines call these same functions, so their numbers agree.
"""

from ray_med.evaluation.perplexity import PerplexityAccumulator, lm_nll, perplexity

__all__ = ["PerplexityAccumulator", "lm_nll", "perplexity"]
