"""Autoscaling on one machine: Ray's fake multi-node autoscaler adds and removes nodes, Serve adds and removes replicas.

A demonstration of counts over time, not a timing benchmark: the benchmark rules of the
other scripts here (median of 3 repeats against a baseline) are for timings, and this
script makes one run and records what it saw. The seconds in its summary are those of
that one run, read off a ~1 s sampling of the cluster on a shared 2-core machine; they
say how long this run took, not how fast Ray's autoscaler is.

What it runs, all in one private cluster that it starts and stops itself:

1. A head node with 0 CPUs (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``,
   private ports and a private temp dir; token auth on), under Ray's fake multi-node
   provider: each "node" the autoscaler launches is a real raylet (with its own agents
   and workers) on this machine. One worker node type, ``cpu_worker``: 2 CPUs each,
   ``min_workers`` 0, ``max_workers`` 4, ``idle_timeout_minutes`` 0.25 (15 s).
2. **job**: a request for more workers than exist, the way Ray Train asks for its worker
   group: a placement group of 3 bundles of 2 CPUs (2 with ``--quick``) and one task per
   bundle that sleeps. The head cannot hold any of it, so the autoscaler launches
   worker nodes until the group is placed; the tasks run, the group is removed.
3. **idle**: nothing asks for anything; after the idle timeout the autoscaler
   terminates the worker nodes, back to 0.
4. **serve**: a Serve deployment (1 CPU a replica, so its replicas need worker nodes) with
   ``autoscaling_config`` min 1, max 4 replicas (3 with ``--quick``),
   ``target_ongoing_requests`` 1, upscale/downscale delays of 2 s / 6 s, a look-back
   window of 6 s and the handle's metrics every 1 s. Its first replica
   makes the autoscaler launch a node. **serve_load**: 8 client threads send requests
   through a DeploymentHandle (each request sleeps 0.4 s in the replica) until the
   deployment has its maximum of replicas, and a few seconds more; the extra replicas
   need another node, which the autoscaler launches. **serve_cooldown**: the load stops;
   Serve scales back down to 1 replica, and the node left without replicas idles out.
5. **teardown**: the Serve app is deleted and the last worker node idles out.

Every ~1 s it records the alive worker nodes (``ray.nodes()``), the nodes the autoscaler
is launching (its status in the GCS), and the Serve replicas (``serve.status()``),
with the phase. Writes ``bench/results/autoscaling.json`` (config, time series, summary)
and ``bench/results/autoscaling.png`` (nodes and replicas against time, phases shaded),
and prints the JSON's summary as the last stdout line. It exits 1, with ``error`` in the
JSON, when a phase failed or timed out or when it did not see what it is for (the job's
nodes, 0 nodes after the idle timeout, the maximum of replicas under load, 1 replica
after it, 0 nodes after the teardown).

    python bench/autoscaling.py            # about 3 minutes on a 2-core machine
    python bench/autoscaling.py --quick    # smaller: 2 nodes for the job, 3 replicas max, shorter holds
    python bench/autoscaling.py --out /tmp/a.json --timeout 600 --keep-logs /tmp/a_logs   # + Ray's logs

It touches no other Ray on the machine: every port the head would take by default is a
free one, its temp dir is its own (``/tmp/rmas*``), and it stops only the processes it
started (the head's process group, then any process still naming its temp dir, by pid).
It does not run ``ray stop``. The phases run as a Ray driver in a child process, which
records to a file as it goes; this process starts the head, bounds the driver by
``--timeout`` (default 420 s), then always stops the cluster (up to about a minute more)
and writes whatever was recorded, with ``error`` set if a phase failed or timed out.

Private Ray interfaces used: the fake multi-node provider itself (``RAY_FAKE_CLUSTER=1``,
provider ``fake_multinode``, meant for testing autoscaling) and, for the "nodes being
launched" line only, the v1 autoscaler's status in the GCS (``__autoscaling_status``).
The node count is ``ray.nodes()``, the replica count ``serve.status()``. Serve's
``metrics_interval_s`` (how often the handle reports its queue; 10 s by default) is set
to 1 s: the field is marked deprecated in favour of environment variables, but it is
what Ray 2.60 reads. With a 2 s look-back window and 0.5 s metrics, Serve's view of the
load on this busy machine often fell to 0 requests and some runs never scaled past 1
replica; with 6 s and 1 s the runs here scaled every time, but Serve's decision still
depends on metrics arriving in time, hence the check above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
APP, DEPLOYMENT = "autoscale_demo", "Sleeper"
HEAD_MARK = "node:__internal_head__"


def cluster_config(gcs_address: str, max_workers: int, idle_minutes: float) -> dict:
    """The fake multi-node cluster: a 0-CPU head and one worker node type (cf. Ray's fake_multi_node/example.yaml)."""
    return {
        "cluster_name": "rmas_fake",
        "max_workers": max_workers,
        "provider": {
            "type": "fake_multinode",
            # The provider starts each worker raylet against this GCS (its default is <ip>:6379,
            # the default port, which another Ray on this machine may hold).
            "gcs_address": gcs_address,
            "launch_multiple": True,  # a launch of n nodes starts n (the default starts one per launch)
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {
                "resources": {"CPU": 2, "object_store_memory": 150 * 1024**2},
                "node_config": {}, "min_workers": 0, "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


# ----------------------------------------------------------------------------- cluster


def start_head(temp_dir: str, config_path: Path, port: int, env: dict) -> subprocess.Popen:
    from ray_med.runtime import free_port

    ray_bin = str(Path(sys.executable).parent / "ray")
    # Every fixed default port gets a free one: another Ray on this machine may hold the defaults.
    ports = {
        "--dashboard-port": free_port(), "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(), "--ray-client-server-port": free_port(),
    }
    log = open(Path(temp_dir) / "head.log", "w")  # the head's output; closed with the process
    return subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=0", "--num-gpus=0",
         f"--temp-dir={temp_dir}", f"--autoscaling-config={config_path}", "--include-dashboard=false",
         "--dashboard-host=127.0.0.1", f"--object-store-memory={150 * 1024**2}", "--disable-usage-stats",
         *(f"{flag}={value}" for flag, value in ports.items())],
        env={**env, "RAY_FAKE_CLUSTER": "1"}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_port(host: str, port: int, head: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                return
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        if time.time() > deadline:
            raise TimeoutError(f"the head's GCS never listened on {host}:{port}")
        time.sleep(1)


def own_pids(temp_dir: str) -> list[int]:
    """This run's processes: every process whose command line names its private temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids


def stop_cluster(head: subprocess.Popen | None, temp_dir: str) -> int:
    """Stop the head's process group, then any process of this run still alive; the count of those."""
    if head is not None and head.poll() is None:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        except ProcessLookupError:
            pass
    # The fake worker nodes' raylets are started by the autoscaler (the head's monitor process),
    # not all in the head's process group: end those naming this run's temp dir, by pid.
    left = own_pids(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while time.time() < deadline and own_pids(temp_dir):
            time.sleep(0.5)
        if not own_pids(temp_dir):
            break
    return len(left)


# ----------------------------------------------------------------------------- sampling


def autoscaler_pending() -> int | None:
    """Worker nodes the (v1) autoscaler is launching, from the status it writes to the GCS (private)."""
    import ray._private.ray_constants as ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return None
    report = json.loads(raw).get("autoscaler_report") or {}
    return sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])


class Recorder(threading.Thread):
    """Samples worker nodes, pending launches and Serve replicas every ``interval`` s, with the phase."""

    def __init__(self, out: Path, interval: float = 1.0):
        super().__init__(daemon=True)
        self.out, self.interval, self.t0 = out, interval, time.time()
        self.phase, self.serve_on = "start", False
        self.rows: list[dict] = []
        self.phases: list[dict] = []
        self.extra: dict = {}  # what the phases report (job, serve, teardown, error)
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def now(self) -> float:
        return round(time.time() - self.t0, 2)

    def set_phase(self, name: str) -> None:
        t = self.now()
        with self._lock:
            if self.phases:
                self.phases[-1]["end"] = t
            self.phases.append({"name": name, "start": t, "end": None})
            self.phase = name
        print(f"[{t:7.1f}s] phase {name}", flush=True)

    def sample(self) -> dict:
        import ray
        from ray import serve

        nodes = [n for n in ray.nodes() if n["Alive"]]
        row = {"t": self.now(), "phase": self.phase,
               "worker_nodes": sum(1 for n in nodes if HEAD_MARK not in n["Resources"])}
        try:
            row["pending_nodes"] = autoscaler_pending()
        except Exception:  # the status is private and best effort
            row["pending_nodes"] = None
        row["replicas_running"] = row["replicas_total"] = None
        if self.serve_on:
            try:
                deps = serve.status().applications[APP].deployments
                states = {str(getattr(k, "value", k)): v for k, v in deps[DEPLOYMENT].replica_states.items()}
                row["replicas_running"] = states.get("RUNNING", 0)
                row["replicas_total"] = sum(states.values())
            except Exception:  # the app is being deployed or deleted
                row["replicas_running"] = row["replicas_total"] = 0
        return row

    def run(self) -> None:
        last = None
        while not self._halt.is_set():
            start = time.time()
            try:
                row = self.sample()
            except Exception as e:  # a missed sample is not fatal
                print(f"sample failed: {e!r}", flush=True)
            else:
                with self._lock:
                    self.rows.append(row)
                self.dump()
                key = (row["phase"], row["worker_nodes"], row["pending_nodes"], row["replicas_running"],
                       row["replicas_total"])
                if key != last:
                    print(f"[{row['t']:7.1f}s] {row['phase']:<15} worker nodes {row['worker_nodes']}"
                          f" (launching {row['pending_nodes']})  replicas {row['replicas_running']}"
                          f"/{row['replicas_total']}", flush=True)
                    last = key
            self._halt.wait(max(0.0, self.interval - (time.time() - start)))

    def latest(self) -> dict:
        with self._lock:
            return dict(self.rows[-1]) if self.rows else {}

    def wait_for(self, what: str, pred, timeout: float) -> float | None:
        """Seconds until a sample taken after this call satisfies ``pred`` (None on timeout)."""
        start = time.time()
        n0 = len(self.rows)
        while time.time() - start < timeout:
            with self._lock:
                new = self.rows[n0:]
            for row in new:
                if pred(row):
                    return round(time.time() - start, 1)
            n0 += len(new)
            time.sleep(0.25)
        print(f"timed out after {timeout:.0f} s waiting for {what}", flush=True)
        return None

    def dump(self) -> None:
        """All recorded so far, to ``out`` (replaced whole), for the supervising process to read."""
        with self._lock:
            text = json.dumps({"rows": self.rows, "phases": self.phases, **self.extra})
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.out)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)
        with self._lock:
            if self.phases and self.phases[-1]["end"] is None:
                self.phases[-1]["end"] = self.now()
        self.dump()


# ----------------------------------------------------------------------------- phases


def job_phase(rec: Recorder, bundles: int, work_s: float, timeout: float) -> dict:
    """A placement group of ``bundles`` x 2 CPUs (as Ray Train asks for a worker group), one sleeping task per bundle."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=2)
    def work(seconds: float) -> str:
        time.sleep(seconds)
        return ray.get_runtime_context().get_node_id()

    rec.set_phase("job")
    t_submit = time.time()
    pg = placement_group([{"CPU": 2}] * bundles, strategy="PACK")
    try:
        if not pg.wait(timeout_seconds=timeout):
            raise TimeoutError(f"the placement group of {bundles} x 2 CPUs was not placed in {timeout:.0f} s")
        placed_s = round(time.time() - t_submit, 1)
        print(f"placement group of {bundles} x 2 CPUs placed after {placed_s} s", flush=True)
        refs = [work.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                .remote(work_s) for i in range(bundles)]
        nodes = ray.get(refs, timeout=work_s + 120)
    finally:
        remove_placement_group(pg)
    return {"bundles": bundles, "s_submit_to_placed": placed_s, "s_submit_to_done": round(time.time() - t_submit, 1),
            "distinct_nodes_used": len(set(nodes))}


def serve_phases(rec: Recorder, max_replicas: int, clients: int, request_s: float, hold_s: float,
                 load_timeout: float, cool_timeout: float) -> dict:
    from ray import serve

    autoscaling = {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 1,
                   "upscale_delay_s": 2.0, "downscale_delay_s": 6.0, "look_back_period_s": 6.0,
                   # How often the handle reports its queue to the controller (default 10 s; the field is
                   # deprecated in favour of an environment variable, but it is what Ray 2.60 reads).
                   "metrics_interval_s": 1.0}

    @serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4,
                      autoscaling_config=autoscaling, graceful_shutdown_timeout_s=2)
    class Sleeper:
        async def __call__(self, seconds: float) -> str:
            import asyncio

            import ray

            await asyncio.sleep(seconds)
            return ray.get_runtime_context().get_node_id()

    rec.set_phase("serve_deploy")
    serve.start(proxy_location="Disabled")  # requests go through a handle: no HTTP proxy on each fake node
    rec.serve_on = True
    t = time.time()
    handle = serve.run(Sleeper.bind(), name=APP, route_prefix=None)
    deploy_s = round(time.time() - t, 1)
    print(f"app running after {deploy_s} s", flush=True)

    rec.set_phase("serve_load")
    stop, lock = threading.Event(), threading.Lock()
    counts = {"requests": 0, "errors": 0}
    served_by: set[str] = set()

    def client() -> None:
        while not stop.is_set():
            try:
                node = handle.remote(request_s).result(timeout_s=60)
                with lock:
                    counts["requests"] += 1
                    served_by.add(node)
            except Exception as e:  # counted, and the load goes on
                with lock:
                    counts["errors"] += 1
                print(f"request failed: {e!r}", flush=True)

    t_load = time.time()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
        up_s = rec.wait_for(f"{max_replicas} running replicas", lambda r: (r["replicas_running"] or 0) >= max_replicas,
                            load_timeout)
        time.sleep(hold_s)
        stop.set()
    load_s = round(time.time() - t_load, 1)

    rec.set_phase("serve_cooldown")
    t_cool = time.time()
    down_s = rec.wait_for("1 replica", lambda r: r["replicas_total"] == 1, cool_timeout)
    # The node that lost its replicas is idle now: wait for the autoscaler to take it away.
    settle_s = rec.wait_for("the replicas' nodes only", lambda r: r["worker_nodes"] <= 1, cool_timeout)
    if settle_s is not None:
        settle_s = round(time.time() - t_cool, 1)
    return {"autoscaling_config": autoscaling, "replica_num_cpus": 1, "max_ongoing_requests": 4,
            "clients": clients, "request_sleep_s": request_s, "hold_at_max_s": hold_s,
            "s_deploy_to_running": deploy_s, "s_load_start_to_max_replicas": up_s, "load_s": load_s,
            "s_load_stop_to_min_replicas": down_s, "s_load_stop_to_one_node": settle_s,
            "requests": counts["requests"], "errors": counts["errors"], "distinct_nodes_serving": len(served_by)}


# ----------------------------------------------------------------------------- results


def summarize(rows: list[dict], job: dict, srv: dict | None, teardown_s) -> dict:
    def in_phase(*names):
        return [r for r in rows if r["phase"] in names]

    def last(names, key):
        rs = in_phase(*names)
        return rs[-1][key] if rs else None

    def maxof(names, key):
        return max((r[key] or 0 for r in in_phase(*names)), default=None)

    summary = {
        "worker_nodes_at_start": rows[0]["worker_nodes"] if rows else None,
        "job_nodes_needed": job.get("bundles"),
        "job_max_worker_nodes": maxof(["job"], "worker_nodes"),
        "job_s_submit_to_placed": job.get("s_submit_to_placed"),
        "job_distinct_nodes_used": job.get("distinct_nodes_used"),
        "idle_s_to_zero_nodes": job.get("s_idle_to_zero"),
        "worker_nodes_after_idle": last(["idle"], "worker_nodes"),
    }
    if srv:
        summary.update({
            "serve_max_replicas_running": maxof(["serve_load", "serve_cooldown"], "replicas_running"),
            "serve_max_worker_nodes": maxof(["serve_deploy", "serve_load", "serve_cooldown"], "worker_nodes"),
            "serve_s_deploy_to_running": srv["s_deploy_to_running"],
            "serve_s_load_start_to_max_replicas": srv["s_load_start_to_max_replicas"],
            "serve_replicas_after_cooldown": last(["serve_cooldown"], "replicas_total"),
            "serve_s_load_stop_to_min_replicas": srv["s_load_stop_to_min_replicas"],
            "serve_worker_nodes_after_cooldown": last(["serve_cooldown"], "worker_nodes"),
            "serve_s_load_stop_to_one_node": srv["s_load_stop_to_one_node"],
            "serve_requests": srv["requests"], "serve_errors": srv["errors"],
            "serve_distinct_nodes_serving": srv["distinct_nodes_serving"],
            "teardown_s_to_zero_nodes": teardown_s,
            "worker_nodes_after_teardown": last(["teardown"], "worker_nodes"),
        })
    return summary


def plot(rows: list[dict], phases: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"start": "#eeeeee", "job": "#fde0c5", "idle": "#e8e8e8", "serve_deploy": "#d6eaf8",
              "serve_load": "#f9d0d0", "serve_cooldown": "#d5f5e3", "teardown": "#e8e8e8"}
    t = [r["t"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5))
    ax1.step(t, [r["worker_nodes"] for r in rows], where="post", lw=2, color="tab:blue", label="alive worker nodes")
    ax1.step(t, [r["pending_nodes"] if r["pending_nodes"] is not None else float("nan") for r in rows],
             where="post", lw=1.2, ls="--", color="tab:orange",
             label="nodes being launched (autoscaler status, ~5 s updates)")
    ax1.set_ylabel("worker nodes")
    ax2.step(t, [r["replicas_running"] if r["replicas_running"] is not None else float("nan") for r in rows],
             where="post", lw=2, color="tab:red", label="replicas RUNNING")
    ax2.step(t, [r["replicas_total"] if r["replicas_total"] is not None else float("nan") for r in rows],
             where="post", lw=1.2, ls="--", color="tab:purple", label="replicas (all states)")
    ax2.set_ylabel("Serve replicas")
    ax2.set_xlabel("seconds since the driver connected (samples every ~1 s)")
    for ax in (ax1, ax2):
        ymax = max([r["worker_nodes"] for r in rows] + [r["replicas_total"] or 0 for r in rows] + [1])
        ax.set_ylim(-0.2, ymax + 0.8)
        ax.yaxis.get_major_locator().set_params(integer=True)
        for p in phases:
            ax.axvspan(p["start"], p["end"], color=colors.get(p["name"], "#f4f4f4"), alpha=0.8, lw=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    for p in phases:  # the phase names above the top panel
        ax1.text((p["start"] + p["end"]) / 2, 1.01, p["name"], transform=ax1.get_xaxis_transform(),
                 ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver


def driver(spec_path: str) -> None:
    """The phases, as a Ray driver of the private cluster; run in a child process of ``main``.

    Its record goes to a file after every sample, and it leaves with ``os._exit`` once the
    record is complete: a Serve handle's background thread can take the whole process down
    during ``ray.shutdown()``, and the cluster is stopped by the parent anyway.
    """
    spec = json.loads(Path(spec_path).read_text())
    import ray

    ray.init(address=spec["gcs"], logging_level="WARNING", log_to_driver=False)
    rec = Recorder(Path(spec["data"]), interval=1.0)
    rec.start()
    idle_s = spec["idle_minutes"] * 60
    try:
        rec.wait_for("the first sample", lambda r: True, 30)
        print(f"driver connected to {spec['gcs']}; worker nodes {rec.latest().get('worker_nodes')}", flush=True)

        rec.extra["job"] = job = job_phase(rec, spec["bundles"], spec["work_s"], timeout=180)
        rec.set_phase("idle")
        job["s_idle_to_zero"] = rec.wait_for("0 worker nodes", lambda r: r["worker_nodes"] == 0, idle_s + 90)

        rec.extra["serve"] = srv = serve_phases(rec, spec["max_replicas"], spec["clients"], spec["request_s"],
                                                spec["hold_s"], load_timeout=150, cool_timeout=idle_s + 75)
        # A run that did not show what it is for says so (and exits 1), after its teardown.
        missed = [what for what, ok in [
            (f"the job's {spec['bundles']} nodes", (job.get("distinct_nodes_used") or 0) >= spec["bundles"]),
            ("0 worker nodes after the job's idle timeout", job["s_idle_to_zero"] is not None),
            (f"{spec['max_replicas']} Serve replicas under load", srv["s_load_start_to_max_replicas"] is not None),
            ("1 replica after the load", srv["s_load_stop_to_min_replicas"] is not None)] if not ok]

        from ray import serve

        rec.set_phase("teardown")
        serve.delete(APP)
        rec.serve_on = False
        rec.extra["teardown_s"] = rec.wait_for("0 worker nodes", lambda r: r["worker_nodes"] == 0, idle_s + 60)
        rec.wait_for("one more sample", lambda r: True, 5)
        if rec.extra["teardown_s"] is None:
            missed.append("0 worker nodes after the teardown")
        if missed:
            rec.extra["error"] = "not seen: " + "; ".join(missed)
    except BaseException as e:  # recorded; the parent stops the cluster and writes what there is
        rec.extra["error"] = f"{type(e).__name__}: {e}"
        print(f"driver error: {rec.extra['error']}", flush=True)
    finally:
        rec.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if rec.extra.get("error") else 0)


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller and shorter: 2 nodes for the job, 3 replicas max")
    ap.add_argument("--out", default=str(REPO / "bench/results/autoscaling.json"))
    ap.add_argument("--timeout", type=float, default=420, help="hard limit on the phases (the driver), seconds")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the cluster's logs (Ray's session logs) to DIR at the end")
    ap.add_argument("--driver", help=argparse.SUPPRESS)  # internal: run the phases from this spec file
    args = ap.parse_args()
    if args.driver:
        driver(args.driver)  # does not return

    from ray_med.runtime import free_port

    t_start = time.time()
    bundles, work_s, max_replicas, hold_s = (2, 4.0, 3, 4.0) if args.quick else (3, 10.0, 4, 10.0)
    params = {"bundles": bundles, "work_s": work_s, "max_replicas": max_replicas, "hold_s": hold_s,
              "clients": 8, "request_s": 0.4, "idle_minutes": 0.25, "max_workers": 4}

    import ray

    ip = ray._private.services.get_node_ip_address()
    port = free_port()
    gcs = f"{ip}:{port}"
    cfg = cluster_config(gcs, params["max_workers"], params["idle_minutes"])
    # A short private temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rmas", dir="/tmp")
    config_path = Path(temp_dir) / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    data_path = Path(temp_dir) / "record.json"
    spec_path = Path(temp_dir) / "spec.json"
    spec_path.write_text(json.dumps({**params, "gcs": gcs, "data": str(data_path)}))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    head = child = None
    error = None
    record: dict = {}
    try:
        head = start_head(temp_dir, config_path, port, env)
        wait_port(ip, port, head, timeout=120)
        # `ray start` made ~/.ray/auth_token if there was none; the driver presents it.
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        print(f"head up at {gcs} (temp dir {temp_dir}) after {time.time() - t_start:.1f} s", flush=True)
        child = subprocess.Popen([sys.executable, __file__, "--driver", str(spec_path)],
                                 env={**env, "RAY_AUTH_TOKEN": token})
        try:
            child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            error = f"TimeoutError: the driver passed its hard limit of {args.timeout:.0f} s"
            print(error, flush=True)
    except BaseException as e:  # recorded; the cluster is stopped and what there is written
        error = f"{type(e).__name__}: {e}"
        print(f"error: {error}", flush=True)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        if data_path.exists():
            record = json.loads(data_path.read_text())
        error = error or record.get("error")
        if error and head is not None:
            print("--- head log tail ---\n" + (Path(temp_dir) / "head.log").read_text()[-3000:], flush=True)
            for monitor_log in {p.resolve() for p in Path(temp_dir).glob("session_*/logs/monitor.log")}:
                print(f"--- {monitor_log} tail ---\n" + monitor_log.read_text()[-4000:], flush=True)
        t_stop = time.time()
        leftovers = stop_cluster(head, temp_dir)
        stop_s = round(time.time() - t_stop, 1)
        if args.keep_logs:
            for logs in {p.resolve() for p in Path(temp_dir).glob("session_*/logs")}:
                shutil.copytree(logs, Path(args.keep_logs) / logs.parent.name, dirs_exist_ok=True)
            shutil.copy(Path(temp_dir) / "head.log", Path(args.keep_logs) / "head.log")
        shutil.rmtree(temp_dir, ignore_errors=True)
    wall_s = round(time.time() - t_start, 1)

    rows, phases = record.get("rows", []), record.get("phases", [])
    job, srv = record.get("job", {}), record.get("serve")
    summary = summarize(rows, job, srv, record.get("teardown_s"))
    shown = {k: v for k, v in cfg.items() if k in ("max_workers", "available_node_types", "upscaling_speed",
                                                   "idle_timeout_minutes")}
    shown["provider"] = {k: v for k, v in cfg["provider"].items() if k != "gcs_address"}
    result = {
        "benchmark": "autoscaling",
        "kind": "demonstration of counts over time (one run, ~1 s samples), not a timing benchmark: "
                "no repeats and no baseline; the seconds are this run's, on a shared machine",
        "command": "python bench/autoscaling.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, no GPU",
        "ray": ray.__version__,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "cluster_config": shown,
        "head": {"num_cpus": 0, "autoscaler": "v1 (Ray's default), update interval 5 s",
                 "token_auth": True},
        "job": {"request": f"placement group of {bundles} x {{CPU: 2}} (PACK, as Ray Train asks for its "
                           f"worker group), one task of {work_s:g} s per bundle", **job},
        "serve": srv,
        "error": error,
        "wall_s": wall_s,
        "cluster_stop_s": stop_s,
        "processes_stopped_after_head": leftovers,
        "summary": summary,
        "phases": phases,
        "series": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if rows:
        plot(rows, phases, out.with_suffix(".png"),
             f"Ray fake multi-node autoscaler + Serve autoscaling: one run ({result['machine']}, Ray {ray.__version__})")
    print(json.dumps({"benchmark": "autoscaling", "wall_s": wall_s, "error": error, "summary": summary}))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
