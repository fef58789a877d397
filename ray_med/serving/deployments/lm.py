"""The model deployment: a causal LM (QA in three modes, generation and chat, with LoRA adapters per
request) or a multimodal one (generation and chat with an image, image classification).

The folder decides (:func:`~ray_med.models.vlm.is_vlm_folder`): a LLaVA folder gets a
:class:`~ray_med.serving.engines.VLMEngine`, any other an
:class:`~ray_med.serving.engines.LMEngine`. The gateway knows which from the same
folder's config and sends a multimodal model no QA and a text-only one no images.

Top-token QA is dynamically batched (one adapter per batch: Serve splits batches by the
multiplexed model id); chain-of-thought QA and generation run one request at a time, and
stop between tokens when their request is cancelled (the client left, or it timed out).
Sampling uses the request's ``seed``, or a random one when it has none.
Requests arrive as the gateway's typed request bodies and leave as typed results; a
library error is raised and reaches the gateway as itself.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ray_med.data import read_records
from ray_med.evaluation.qa import QAResult
from ray_med.injection.engine import InjectedEngine, is_injected
from ray_med.models.vlm import is_vlm_folder
from ray_med.serving.config import ServeAppConfig
from ray_med.serving.deployments.replica import ComputeThread, adapter_cache, batched, raise_if_error
from ray_med.serving.engines import Generation, LMEngine, VLMEngine
from ray_med.serving.errors import HTTPError
from ray_med.serving.schemas import ChatRequest, ClassifyRequest, GenerateRequest, QARequest, image_bytes
from ray_med.tasks.prompts import QAItem, item_from_record


def _shots(cfg: ServeAppConfig) -> list[QAItem]:
    if cfg.qa.shots <= 0:
        return []
    return [item_from_record(r) for r in read_records(cfg.shots_format, cfg.shots_file).records]


@serve.deployment(name="LMServer")
class LMServer:
    def __init__(self, cfg: ServeAppConfig) -> None:
        cfg = cfg.localized(classifiers=False)  # remote folders: this node's copy (runtime.localize)
        self.cfg = cfg
        self.thread = ComputeThread(cfg.lm)
        self.multimodal = is_vlm_folder(cfg.model)
        self.injected = is_injected(cfg.model)
        if self.injected:
            self.inj = InjectedEngine(cfg.model, cfg.adapter, gate=cfg.gate, folded_dir=cfg.folded_dir)
            # gate folded: the tasks' folded LoRAs, loaded on demand and evicted LRU (the multiplexed id is the task)
            self.get_adapter = adapter_cache(self.thread, self.inj.load_adapter, self.inj.unload_adapter,
                                             cfg.lm.max_adapters)
            return
        if self.multimodal:
            self.vlm = VLMEngine(cfg.model)
            return
        self.engine = LMEngine(cfg.model, cfg.adapters, qa=cfg.qa, shots=_shots(cfg))
        self.get_adapter = adapter_cache(self.thread, self.engine.load_adapter, self.engine.unload_adapter,
                                         cfg.lm.max_adapters)
        self._top_token_batch = batched(self._top_token, cfg.lm)

    def _text_only(self, what: str) -> None:
        if self.multimodal:  # the gateway refuses these first; this guards direct handle calls
            raise HTTPError(422, f"{what} needs a causal LM; the served model is multimodal", "unsupported")

    def _needs_vlm(self) -> None:
        if not self.multimodal:
            raise HTTPError(422, "the served model is text-only; images need a multimodal model", "unsupported")

    async def _adapter(self) -> str | None:
        name = serve.get_multiplexed_model_id() or None
        if name:
            await self.get_adapter(name)
        return name

    async def _top_token(self, prompts: list[list[int]], choices: list[list[str]]) -> list[Any]:
        adapter = await self._adapter()
        return await self.thread.run(self.engine.top_token, prompts, choices, adapter)

    async def qa(self, req: QARequest) -> QAResult:
        self._text_only("/v1/qa")
        # The exemplars are chosen with the request's seed, else the server's (qa.seed):
        # the same question gets the same prompt. Sampling is seeded by the request only.
        cfg = self.engine.qa_config(mode=req.mode, n=req.n, temperature=req.temperature, seed=req.seed)
        item = QAItem(id="request", question=req.question, context=req.context, options=req.options)
        prompt = (await self.thread.run(self.engine.qa_prompts, [item], cfg))[0]
        if cfg.mode == "top_token":
            return raise_if_error(await self._top_token_batch(prompt, item.choices))
        adapter = await self._adapter()
        return await self.thread.run_cancellable(self.engine.chain_of_thought, prompt, item.choices, cfg, adapter,
                                                 seed=req.seed)

    async def generate(self, req: GenerateRequest) -> Generation:
        if self.multimodal:
            image = image_bytes(req.image) if req.image is not None else None
            return await self.thread.run_cancellable(self.vlm.complete, req.prompt, image,
                                                     max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                                                     seed=req.seed)
        if req.image is not None:
            self._needs_vlm()
        adapter = await self._adapter()
        return await self.thread.run_cancellable(self.engine.complete, req.prompt, max_new_tokens=req.max_new_tokens,
                                                 temperature=req.temperature, seed=req.seed, adapter=adapter)

    async def chat(self, req: ChatRequest, max_new_tokens: int) -> Generation:
        if self.multimodal:
            prompt, image = self.vlm.chat_prompt([m.model_dump() for m in req.messages])
            return await self.thread.run_cancellable(self.vlm.complete, prompt, image, max_new_tokens=max_new_tokens,
                                                     temperature=req.temperature, seed=req.seed)
        if any(m.image_urls() for m in req.messages):
            self._needs_vlm()
        adapter = await self._adapter()
        prompt = self.engine.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        return await self.thread.run_cancellable(self.engine.complete, prompt, max_new_tokens=max_new_tokens,
                                                 temperature=req.temperature, seed=req.seed, adapter=adapter)

    async def classify_injected(self, req: ClassifyRequest) -> dict[str, Any]:
        """An injected model's answer to ``req.task`` about the request's image, features or text."""
        await self._adapter()  # gate folded: the task's LoRA (the gateway sets the multiplexed id)
        image = image_bytes(req.image) if req.image is not None else None
        return await self.thread.run(self.inj.classify, req.task, req.modality, image=image, features=req.features,
                                     text=req.text)

    async def generate_injected(self, req: GenerateRequest) -> dict[str, Any]:
        await self._adapter()
        image = image_bytes(req.image) if req.image is not None else None
        return await self.thread.run(self.inj.generate, req.task, req.modality, max_new_tokens=req.max_new_tokens,
                                     image=image, features=req.features, text=req.prompt)

    async def classify_image(self, req: ClassifyRequest) -> dict[str, Any]:
        """Label and probabilities of ``req.image`` under the multimodal task ``req.task`` (text: its question)."""
        self._needs_vlm()
        if req.image is None or req.task is None:
            raise HTTPError(422, "image classification needs both image and task")
        return await self.thread.run(self.vlm.classify_image, req.task, image_bytes(req.image), req.text)
