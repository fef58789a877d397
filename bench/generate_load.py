"""Generation at load: chat requests through Ray Serve's batched decode loop against sequential ``generate``.

Self-contained: a tiny Llama (the demo's ``tiny-llama`` preset, random init) with a BPE
tokenizer trained on MTSamples transcriptions (../shared/data), saved as a folder and
served with ``ray_med.serving.app:build_app`` on an embedded local Ray. The requests are
64 chats ("Summarise: <an MTSamples description>"), 64 new tokens each, greedy.

Measured in one run, each repeat (``--repeats``, default 3) in turn:

* **baseline**: the same 64 prompts, one after another, through HF ``model.generate`` in
  this process (the pre-batching serving path: one request at a time), with as many
  torch threads as the replica.
* **served**: the 64 requests through ``/v1/chat/completions`` with ``stream: true``
  from 1, 4 and 16 concurrent clients (aiohttp, keep-alive), with the app's defaults
  (``stream_interval_s`` 0.05: the first text at once, then a chunk at most every 50 ms). Per request: the time to
  the first content chunk (TTFT) and the time per token after it; per level: generated
  tokens/s over the wall time of the 64 requests.

Also, as the ceiling, the replica's decode loop in this process with no serving stack
(16 sequences at a time over the same 64 prompts); its texts must equal the served ones.

Key ``batched_speedup_16``: tokens/s at 16 clients over the baseline's, as the median of
the repeats (min and max beside it). Writes ``bench/results/generate_load.json`` and
prints it as the last line.

    python bench/generate_load.py [--repeats 3] [--requests 64] [--new-tokens 64] [key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import spread, write_result  # noqa: E402
from serve_load import _pct, ingress_url, serve_env  # noqa: E402

LEVELS = (1, 4, 16)
# One torch thread, in the replica and the baseline alike: on 2 cores the replica's model
# shares them with the proxy and the gateway, and a second thread measured slower under load
# (1,770 against 2,120 tokens/s at 16 clients; its OpenMP threads spin while the others wait).
THREADS = 1


def build_model(out: Path, n: int) -> tuple[Path, list[str]]:
    """A tiny Llama folder (tokenizer trained on MTSamples) and ``n`` chat prompts from MTSamples descriptions."""
    import torch

    from ray_med.data import read_records
    from ray_med.models import build_model, save_pretrained, train_bpe_tokenizer

    shared = Path(os.environ.get("RAY_MED_SHARED_DATA", REPO.parent / "shared" / "data"))
    records = read_records("mtsamples", str(shared / "mtsamples" / "mtsamples_400.csv"), on_error="skip").records
    tok = train_bpe_tokenizer([r.text for r in records], vocab_size=2048)
    torch.manual_seed(0)
    model = build_model("tiny-llama", vocab_size=len(tok))
    path = save_pretrained(model, out / "lm", tokenizer=tok)
    descriptions = [r.meta["description"][:300] for r in records if r.meta.get("description")]
    return path, [f"Summarise: {descriptions[i % len(descriptions)]}" for i in range(n)]


class Baseline:
    """Sequential in-process generation: HF ``generate``, one request at a time."""

    def __init__(self, path: Path) -> None:
        import torch

        from ray_med.serving.engines import LMEngine

        torch.set_num_threads(THREADS)
        self.engine = LMEngine(str(path), {})

    def ids(self, prompt: str, new: int) -> list[int]:
        return self.engine.encode_prompt(self.engine.chat_prompt([{"role": "user", "content": prompt}]), new)

    def run(self, prompts: list[str], new: int) -> tuple[float, int]:
        """(tokens/s, tokens) over the prompts in order."""
        import torch

        tok, model = self.engine.tokenizer, self.engine.model
        tokens = 0
        start = time.perf_counter()
        for p in prompts:
            ids = torch.tensor([self.ids(p, new)])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            tokens += out.shape[1] - ids.shape[1] - int(out[0, -1] == tok.eos_token_id)
        return tokens / (time.perf_counter() - start), tokens

    def batched(self, prompts: list[str], new: int, width: int) -> tuple[float, list[str]]:
        """(tokens/s, texts) of the replica's decode loop in this process, ``width`` sequences at a time."""
        from ray_med.generation.decoder import GenRequest

        self.engine.decoder.max_batch = width
        start = time.perf_counter()
        seqs = self.engine.decode([GenRequest(self.ids(p, new), new) for p in prompts])
        return sum(len(s.tokens) for s in seqs) / (time.perf_counter() - start), [s.text for s in seqs]


async def _stream(session, url: str, prompt: str, new: int) -> tuple[float, float, int, str]:
    """(ttft s, seconds per token after the first, completion tokens, text) of one streamed chat."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": new,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage, text = None, []
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else len(text)
    first = first or end
    return first - t0, (end - first) / max(n - 1, 1), n, "".join(text)


async def served(url: str, prompts: list[str], new: int, clients: int) -> dict:
    import aiohttp

    queue = iter(range(len(prompts)))
    ttft, per_token, tokens, texts = [], [], 0, {}

    async def client(session) -> None:
        nonlocal tokens
        for i in queue:
            t, pt, n, text = await _stream(session, url, prompts[i], new)
            ttft.append(t)
            per_token.append(pt)
            tokens += n
            texts[i] = text

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=1800)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "ttft_p50_ms": 1000 * _pct(ttft, 0.5),
            "ttft_p99_ms": 1000 * _pct(ttft, 0.99), "per_token_p50_ms": 1000 * _pct(per_token, 0.5),
            "per_token_p99_ms": 1000 * _pct(per_token, 0.99), "texts": [texts[i] for i in range(len(prompts))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ingress", choices=("proxy", "direct"), default="proxy",
                    help="proxy: through Serve's HTTP proxy (Serve's default); direct: to the gateway replica's "
                         "own HTTP server (RAY_SERVE_ENABLE_DIRECT_INGRESS=1, as bench/serve_load.py)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "generate_load.json"))
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the Serve app config")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = serve_env(args.ingress, [])
    os.environ.update(env)  # before Ray starts: Serve's controller and replicas read them at start-up

    import ray
    from ray import serve

    from ray_med.runtime import free_port
    from ray_med.serving.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="generate_load-"))
    path, prompts = build_model(tmp, args.requests)
    base = Baseline(path)
    base.run(prompts[:2], 4)  # warm up
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = {"model": str(path), "model_name": "tiny", "max_new_tokens": args.new_tokens,
           "lm": {"num_cpus": 1, "torch_threads": THREADS, "max_batch_size": 32, "max_ongoing_requests": 64},
           "overrides": args.overrides}
    serve.run(build_app(app), name="generate_load", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    if args.ingress == "direct":
        url = ingress_url(url, "generate_load")
    asyncio.run(served(url, prompts[:2], 4, 2))  # warm up

    runs: list[dict] = []
    for rep in range(args.repeats):
        tps, tokens = base.run(prompts, args.new_tokens)
        loop_tps, loop_texts = base.batched(prompts, args.new_tokens, 16)
        run = {"baseline_tokens_per_s": tps, "baseline_tokens": tokens, "in_process_loop_16_tokens_per_s": loop_tps}
        for clients in LEVELS:
            run[f"c{clients}"] = asyncio.run(served(url, prompts, args.new_tokens, clients))
        # Greedy: every level decodes the same tokens (batched equals alone), so the counts agree.
        texts = {c: run[f"c{c}"].pop("texts") for c in LEVELS}
        run["same_text_at_every_level"] = texts[1] == texts[4] == texts[16] == loop_texts
        runs.append(run)
        print(json.dumps({"repeat": rep, **{k: v for k, v in run.items()}}), flush=True)
    serve.shutdown()
    ray.shutdown()

    result: dict = {
        "benchmark": "generate_load", "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "model": "tiny-llama (random init), BPE 2048 on MTSamples", "requests": args.requests,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "overrides": args.overrides,
        "ingress": args.ingress, "serve_env": env,
        "baseline": "sequential in-process HF generate (one request at a time)",
        "served": "/v1/chat/completions, stream=true, greedy, through Ray Serve",
        "baseline_tokens_per_s": spread([r["baseline_tokens_per_s"] for r in runs], 1),
        # The ceiling: the same loop with no serving stack, 16 sequences at a time.
        "in_process_loop_16_tokens_per_s": spread([r["in_process_loop_16_tokens_per_s"] for r in runs], 1),
        "in_process_loop_16_speedup": spread([r["in_process_loop_16_tokens_per_s"] / r["baseline_tokens_per_s"]
                                              for r in runs], 2),
    }
    for c in LEVELS:
        level = {k: spread([r[f"c{c}"][k] for r in runs], 2) for k in runs[0][f"c{c}"] if k != "tokens"}
        level["speedup"] = spread([r[f"c{c}"]["tokens_per_s"] / r["baseline_tokens_per_s"] for r in runs], 2)
        result[f"clients_{c}"] = level
    result["same_text_at_every_level"] = all(r["same_text_at_every_level"] for r in runs)
    result["runs"] = runs
    for c in LEVELS:
        result[f"batched_speedup_{c}"] = result[f"clients_{c}"]["speedup"]["median"]
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
