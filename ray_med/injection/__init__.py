"""Knowledge injection (FedKIM's server): the federated encoders projected into an LLM and trained with an adapter.

* :mod:`~ray_med.injection.config`: the job's config (tasks with their texts, method, LLM);
* :mod:`~ray_med.injection.model`: the injected model, its batches and its folder format;
* :mod:`~ray_med.injection.train`: the training loop over the seen tasks (no Ray);
* :mod:`~ray_med.injection.job`: ``jobs/inject.py`` on Ray Train;
* :mod:`~ray_med.injection.evaluate`: ``evaluate.py multimodal`` on an injected model.
"""
