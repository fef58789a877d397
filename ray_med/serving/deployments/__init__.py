"""The Serve deployments, one module each: ``gateway`` (the FastAPI ingress), ``lm`` and ``classifier``.

They are module-level classes; :func:`ray_med.serving.app.build_app` sizes them with
``.options()`` and binds them with the typed :class:`~ray_med.serving.config.ServeAppConfig`,
from which each replica sets its batching and adapter cache at start-up.
"""
