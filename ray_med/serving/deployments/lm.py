"""The model deployment: a causal LM (QA in three modes, generation and chat, with LoRA adapters per
request) or a multimodal one (generation and chat with an image, image classification).

The folder decides (:func:`~ray_med.models.vlm.is_vlm_folder`): a LLaVA folder gets a
:class:`~ray_med.serving.engines.VLMEngine`, any other an
:class:`~ray_med.serving.engines.LMEngine`. The gateway knows which from the same
folder's config and sends a multimodal model no QA and a text-only one no images.

Top-token QA is dynamically batched (one adapter per batch: Serve splits batches by the
multiplexed model id). Generation (``generate_text``, ``generate_stream``) and
chain-of-thought QA on a causal LM share one decode loop
(:class:`~ray_med.generation.decoder.BatchDecoder`): a request is submitted from the
event loop (a locked inbox) and joins the running batch at the next step; one driver
task runs steps on the compute thread, up to ``STEP_BUDGET_S`` per call, so adapter
loads and top-token batches interleave between calls. A sequence whose forward fails
fails its own request only. A streaming request receives its text as it is decoded; a cancelled one
(the client left, or it timed out) leaves the batch at the next step. Sampling uses the
request's ``seed``, or a random one when it has none. A multimodal model generates one
request at a time.
Requests arrive as the gateway's typed request bodies and leave as typed results; a
library error is raised and reaches the gateway as itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from ray_med.data import read_records
from ray_med.evaluation.qa import QAResult, cot_result
from ray_med.generation.decoder import GenRequest, Sequence_
from ray_med.generation.spec import Delta, Done, GenSpec
from ray_med.injection.engine import InjectedEngine, is_injected
from ray_med.models.vlm import is_vlm_folder
from ray_med.serving.config import ServeAppConfig
from ray_med.serving.deployments.replica import ComputeThread, adapter_cache, batched, raise_if_error
from ray_med.serving.engines import Generation, LMEngine, VLMEngine, generation
from ray_med.serving.errors import HTTPError
from ray_med.serving.schemas import ClassifyRequest, GenerateRequest, QARequest, image_bytes
from ray_med.tasks.prompts import QAItem, item_from_record

# How long one call on the compute thread may decode before it yields to other model calls.
STEP_BUDGET_S = 0.02


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
        self.engine = LMEngine(cfg.model, cfg.adapters, qa=cfg.qa, shots=_shots(cfg), max_batch=cfg.lm.max_batch_size)
        self._driver: asyncio.Task | None = None
        self._waiters: dict[int, asyncio.Future] = {}
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
        seqs = await self._decode(self.engine.cot_requests(prompt, cfg, adapter, seed=req.seed))
        return cot_result([s.text for s in seqs], item.choices)

    # ---- the decode loop

    async def _drive(self) -> None:
        """Run decode steps while any sequence is running or waiting, then stop."""
        try:
            while await self.thread.run(self.engine.run_for, STEP_BUDGET_S) or self.engine.decoder.busy():
                pass  # the second check is on this loop, where submissions happen: none is missed
        except BaseException as exc:  # a failed step fails every request in it, never silently
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("decode loop stopped"))
            self._waiters.clear()
            raise
        finally:
            self._driver = None

    def _submit(self, req: GenRequest, on_text: Any = None,
                wake: asyncio.Event | None = None) -> tuple[Sequence_, asyncio.Future]:
        """Queue ``req`` in the decode loop; the future resolves (and ``wake`` is set) when it ends."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def resolve(seq: Sequence_) -> None:
            self._waiters.pop(seq.id, None)
            if fut.done():
                return
            if seq.error is not None:  # its forward or sampling failed: this request fails, the others go on
                fut.set_exception(seq.error)
            else:
                fut.set_result(seq)

        seq = self.engine.submit(req, on_text, lambda s: loop.call_soon_threadsafe(resolve, s))
        if wake is not None:  # however the request ends (its result, its error, the loop's failure)
            fut.add_done_callback(lambda _: wake.set())
        self._waiters[seq.id] = fut
        if self._driver is None:
            self._driver = asyncio.create_task(self._drive())
        return seq, fut

    async def _decode(self, reqs: list[GenRequest]) -> list[Sequence_]:
        """Decode ``reqs`` in the shared batch; cancelling the caller cancels them."""
        pending = [self._submit(r) for r in reqs]
        try:
            return [await fut for _, fut in pending]
        except asyncio.CancelledError:
            for seq, _ in pending:
                seq.cancel()
            raise

    async def generate_text(self, spec: GenSpec) -> Generation:
        """One generation (prompt or chat), decoded in the shared batch."""
        if self.multimodal:
            return await self._vlm_generate(spec)
        adapter = await self._adapter()
        req = self.engine.gen_request(spec, adapter)
        (seq,) = await self._decode([req])
        return generation(seq)

    async def generate_stream(self, spec: GenSpec) -> AsyncIterator[Delta | Done]:
        """One generation as it is decoded: Delta events, then one Done. Closing the stream cancels it."""
        if self.multimodal:
            out = await self._vlm_generate(spec)
            yield Delta(out.text)
            yield Done(out.finish_reason, out.prompt_tokens, out.completion_tokens)
            return
        adapter = await self._adapter()
        req = self.engine.gen_request(spec, adapter)
        loop = asyncio.get_running_loop()
        # The compute thread appends text here and wakes this loop only when this stream is
        # waiting for it: one wake-up per chunk, not one per token (the loop and the model
        # share the GIL, so every wake-up slows the decode).
        pending: list[str] = []
        wake = asyncio.Event()
        armed = [True]

        def on_text(text: str) -> None:
            pending.append(text)
            if armed[0]:
                armed[0] = False
                loop.call_soon_threadsafe(wake.set)

        seq, fut = self._submit(req, on_text, wake=wake)
        last = None
        try:
            while not fut.done():
                await wake.wait()
                if last is not None and not fut.done():  # the first text goes at once, then a chunk per interval
                    wait = self.cfg.stream_interval_s - (loop.time() - last)
                    if wait > 0:
                        await asyncio.wait([fut], timeout=wait)
                wake.clear()
                armed[0] = True
                if pending:  # everything decoded since the last chunk, as one
                    n = len(pending)
                    text = "".join(pending[:n])
                    del pending[:n]
                    yield Delta(text)
                    last = loop.time()
            if pending:  # text of the last step
                yield Delta("".join(pending))
            done = fut.result()
            yield Done(done.finish_reason or "stop", len(req.prompt), len(done.tokens))
        finally:
            if not seq.done:  # the client left (or the stream was closed): stop decoding it
                seq.cancel()

    async def decode_stats(self) -> dict[str, int]:
        """The decode loop's counters: active, waiting, finished, cancelled, generated_tokens, steps, max_batch_seen."""
        if self.multimodal or self.injected:
            return {}
        d = self.engine.decoder
        return {"active": d.active, "waiting": len(d.waiting), **d.stats}

    async def _vlm_generate(self, spec: GenSpec) -> Generation:
        """One multimodal generation (one request at a time, through transformers' generate)."""
        if spec.stop or spec.top_p < 1.0:
            raise HTTPError(422, "stop and top_p are not supported by the multimodal model; leave them unset",
                            param="stop" if spec.stop else "top_p")
        if spec.messages is not None:
            prompt, image = self.vlm.chat_prompt(spec.messages)
        else:
            if spec.prompt is None:
                raise HTTPError(422, "prompt is required")
            prompt, image = spec.prompt, image_bytes(spec.image) if spec.image is not None else None
        out = await self.thread.run_cancellable(self.vlm.complete, prompt, image, max_new_tokens=spec.max_new_tokens,
                                                temperature=spec.temperature, seed=spec.seed)
        out.finish_reason = "length" if out.completion_tokens >= spec.max_new_tokens else "stop"
        return out

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
