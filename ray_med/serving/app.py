"""The Ray Serve application: ``build_app(args)`` sizes and binds the deployments.

    serve run cluster/serve/tiny.yaml        # import_path: ray_med.serving.app:build_app

``args`` (the Serve config's application args, plus optional ``overrides``: a list of
``key=value``) are read strictly into :class:`~ray_med.serving.config.ServeAppConfig`,
every folder is checked on the driver, and the typed config is bound to:

* :class:`~ray_med.serving.deployments.gateway.Gateway`, the HTTP API;
* :class:`~ray_med.serving.deployments.lm.LMServer`, when a causal LM is served; with
  ``engine: vllm``, :class:`~ray_med.serving.deployments.vllm.VLLMServer` instead, over a Ray Serve
  LLM ``LLMServer`` (vLLM) child deployment (:func:`~ray_med.serving.deployments.vllm.build_llm_app`);
* :class:`~ray_med.serving.deployments.classifier.ClassifierServer`, when the
  classifiers run in their own deployment (``classify_in_gateway: false``).
"""

from __future__ import annotations

from typing import Any

from ray_med.config import apply_overrides, from_dict
from ray_med.errors import ConfigError, ModelError
from ray_med.serving.config import ServeAppConfig
from ray_med.serving.deployments.classifier import ClassifierServer
from ray_med.serving.deployments.gateway import Gateway
from ray_med.serving.deployments.lm import LMServer
from ray_med.serving.deployments.replica import options
from ray_med.serving.deployments.vllm import VLLMServer, build_llm_app
from ray_med.serving.vllm import proxy_part, require_vllm


def app_config(args: dict[str, Any]) -> ServeAppConfig:
    """The typed config of ``args`` (a ServeAppConfig as a dict; ``overrides``: key=value list), unchecked."""
    args = dict(args or {})
    overrides = args.pop("overrides", []) or []
    return from_dict(ServeAppConfig, apply_overrides(ServeAppConfig, args, overrides), where="serve args")


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for ``args`` (a ServeAppConfig as a dict; ``overrides``: key=value list)."""
    cfg = app_config(args)
    if cfg.engine == "vllm":
        require_vllm()  # before any download: without vLLM nothing of this app could start
    try:  # folders in remote storage are checked on a local copy; each replica makes its own
        cfg.localized().check()
    except ModelError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.model and cfg.engine == "vllm":
        # Built from cfg as written: Ray Serve LLM downloads the remote LoRA folders itself.
        lm = VLLMServer.options(**options(proxy_part(cfg), cfg)).bind(cfg, build_llm_app(cfg))
    else:
        lm = LMServer.options(**options(cfg.lm, cfg)).bind(cfg) if cfg.model else None
    remote = cfg.classifiers and not cfg.classify_in_gateway
    classifier = ClassifierServer.options(**options(cfg.classifier, cfg)).bind(cfg) if remote else None
    local = bool(cfg.classifiers and cfg.classify_in_gateway)
    gateway = Gateway.options(**options(cfg.gateway, cfg, hosts=cfg.classifier if local else None))
    return gateway.bind(cfg, lm, classifier)
