"""The stage-2 classifiers, dynamically batched: inside the gateway, or as their own deployment.

:class:`Classifiers` runs them: the engine on a compute thread, an adapter cache and a
dynamic batch that groups requests by classifier. The gateway holds one
(``classify_in_gateway: true``, the default for encoder-sized classifiers: no Ray hop per
request); :class:`ClassifierServer` is the same runner as a deployment of its own, for
classifiers that need their own replicas or GPUs.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ray_med.errors import RayMedError
from ray_med.serving.config import ServeAppConfig
from ray_med.serving.deployments.replica import ComputeThread, adapter_cache, batched, raise_if_error
from ray_med.serving.engines import ClassifierEngine
from ray_med.serving.schemas import ClassifyRequest


class Classifiers:
    """The classifiers of a replica: the same engine, batching and adapter cache wherever they run."""

    def __init__(self, cfg: ServeAppConfig) -> None:
        cfg = cfg.localized(lm=False)  # remote folders: this node's copy (runtime.localize)
        self.thread = ComputeThread(cfg.classifier)
        self.engine = ClassifierEngine(cfg.classifiers, max_length=cfg.classify_max_length)
        self.get_classifier = adapter_cache(self.thread, self.engine.load, self.engine.unload,
                                            cfg.classifier.max_adapters)
        self._batch = batched(self._classify, cfg.classifier)
        self._pending = 0  # requests inside classify(), either path

    async def _classify(self, names: list[str], texts: list[str], pairs: list[str | None]) -> list[Any]:
        # In the gateway the classifier comes from the body, so one batch may mix them: group them.
        out: list[Any] = [None] * len(texts)
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            try:
                await self.get_classifier(name)
                rows: list[Any] = await self.thread.run(self.engine.classify, name, [texts[i] for i in idx],
                                                        [pairs[i] for i in idx])
            except RayMedError as exc:
                rows = [exc] * len(idx)
            for i, row in zip(idx, rows, strict=True):
                out[i] = row
        return out

    async def classify(self, name: str, req: ClassifyRequest) -> dict[str, Any]:
        # A request that finds no other pending is a batch of one anyway: it goes straight
        # to the compute thread, skipping serve.batch's queue and batch task (~0.5 ms at low
        # load). Requests arriving while any is pending are batched as before; the lone one
        # holds no batch slot, so one more batch may form behind it on the compute thread.
        lone = self._pending == 0
        self._pending += 1
        try:
            if lone:
                out = (await self._classify([name], [req.text], [req.text_pair]))[0]
            else:
                out = await self._batch(name, req.text, req.text_pair)
        finally:
            self._pending -= 1
        return raise_if_error(out)


@serve.deployment(name="ClassifierServer")
class ClassifierServer:
    """The classifiers as their own deployment; the gateway names one with the multiplexed model id."""

    def __init__(self, cfg: ServeAppConfig) -> None:
        self.classifiers = Classifiers(cfg)

    async def classify(self, req: ClassifyRequest) -> dict[str, Any]:
        return await self.classifiers.classify(serve.get_multiplexed_model_id(), req)
