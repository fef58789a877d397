"""Adapters: the method registry (one folder per method), stacking, the classifier folder, multi-adapter hosting.

Core (no Ray, no DeepSpeed). :mod:`~ray_med.adapters.registry` maps a method name to its
config, injection, loading and serving host; ``lora/``, ``adaption_prompt/``, ``prefix/``,
``prompt/`` and ``ptuning/`` are the PEFT methods, and ``m3oe/`` (a mixture of LoRA experts
gated by task and modality text) has layers of its own. :mod:`~ray_med.adapters.stacking` composes a
stage-2 classifier, :mod:`~ray_med.adapters.classifier` owns its folder format, and
:mod:`~ray_med.adapters.host` keeps many adapters on one base for serving and evaluation.
"""
