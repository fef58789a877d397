"""Evaluation: metrics, perplexity, classifier inference, the QA inference modes, and the ``evaluate`` job's tasks.

Core (no Ray, no DeepSpeed): the offline evaluation job, the in-training evaluation and
the serving engines call these same functions, so their numbers agree. The package
imports nothing itself: :mod:`~ray_med.evaluation.config` (read with every job config)
stays free of torch.
"""
