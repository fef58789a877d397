"""Losing a node, on a multi-node Ray on one machine: pretraining, a federation, a Serve app.

* Pretraining: 2 workers (ZeRO-2) on 2 of 3 ``trainer`` nodes. At step 5 rank 1 marks its
  node and the test removes that node (no graceful shutdown: a lost machine). Ray Train
  restarts the group on the 2 nodes left from the step-3 checkpoint, and the run ends
  with the same losses, weights and optimizer state as a run never interrupted. The same
  run folder then resumes for more steps, and its model is a plain HF folder.
* Federation: 3 hospitals pinned to their own nodes by ``hospital_*`` resources. The
  node of hospital_b goes after round 1: the federation goes on without it ("site
  unavailable"), and re-admits it once a node with its resource is back.
* Serve: 2 gateway replicas on 2 ``serve`` nodes (at most one per node). One node goes
  under a steady request loop; the other replica keeps answering, at most
  ``SERVE_ERROR_BOUND`` requests fail (those in flight on the lost replica), and a
  re-added node brings the app back to 2 replicas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SERVE_ERROR_BOUND = 6
"""Requests that may fail when a serving node is lost: those in flight on its replica (2
client threads, each with at most a few requests routed there before the router learns
the replica is gone)."""


def wait_for(check: Callable[[], object], *, timeout: float, what: str, every: float = 0.5) -> object:
    """Poll ``check`` until it returns something truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Background:
    """Run ``fn`` in a thread; ``result()`` re-raises what it raised (a failed assertion included)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.value: object = None

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as exc:  # noqa: BLE001  (handed to the test's thread)
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 60) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the background check did not finish"
        if self.error is not None:
            raise self.error
        return self.value


def _node(cluster, node_id: str):
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    return node


# --- pretraining -------------------------------------------------------------------------


def _pretrain_args(storage: Path, shared: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "jobs/configs/pretrain/tiny.yaml"),
        f"run.storage={storage}", f"run.name={name}", f"corpus.root={shared}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.resources_per_worker={trainer: 1}",
        "deepspeed.zero_stage=2",
        "train.seq_len=64", "train.micro_batch_size=4", "train.log_every=1", "train.report_every=2",
        "tokenizer.vocab_size=512", "optim.warmup_steps=2", "eval.every_steps=100", "eval.max_sequences=8",
        "checkpoint.every_steps=3", "checkpoint.keep=2", *extra,
    ]


def _train_rows(run: Path) -> list[dict]:
    return [r for r in json.loads((run / "metrics.json").read_text()) if "loss" in r]


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint object, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _deepspeed_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of every rank's DeepSpeed files (weights, optimizer and scheduler state) in a checkpoint."""
    out = {}
    for f in sorted((checkpoint / "ds").glob("*.pt")):
        out.update(_tensors(torch.load(f, map_location="cpu", weights_only=False), f.name))
    return out


@pytest.mark.deepspeed
def test_pretraining_loses_a_node_resumes_exactly_and_goes_on(cluster_nodes, job_main, shared_data, tmp_path,
                                                               capsys) -> None:
    cluster = cluster_nodes
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    name = f"nodeloss-{uuid.uuid4().hex[:6]}"
    marker = Path(tempfile.gettempdir()) / f"ray_med-failed-{name}"
    done = threading.Event()

    def remove_rank1_node() -> str | None:
        text = wait_for(lambda: done.is_set() or (marker.is_file() and marker.read_text()), timeout=400,
                        what="rank 1 at step 5")
        if text is True:  # the job ended first: its exit code says why
            return None
        step, node_id = text.split()
        cluster.remove_node(_node(cluster, node_id), allow_graceful=False)
        return node_id

    killer = Background(remove_rank1_node)
    try:
        code = job_main("pretrain")(_pretrain_args(tmp_path, shared_data, name, "train.max_steps=6",
                                                   "train.fail_at_step=5", "train.fail_mode=hold",
                                                   "scaling.max_failures=2"))
    finally:
        done.set()
    lost = killer.result()
    assert code == 0
    assert lost in {n.node_id for n in nodes} and lost not in {n.node_id for n in cluster.worker_nodes}
    run = tmp_path / name
    rows = _train_rows(run)
    # Steps 4-5 ran twice (after the step-3 checkpoint, then again on the nodes left);
    # the history restored from that checkpoint has each step once.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    history = json.loads((run / "metrics.json").read_text())
    assert len([r for r in history if r["step"] == 0]) == 1  # resumed, not restarted from scratch

    # Exact resume: the same run never interrupted ends with the same weights and optimizer state.
    ref_name = f"whole-{uuid.uuid4().hex[:6]}"
    assert job_main("pretrain")(_pretrain_args(tmp_path, shared_data, ref_name, "train.max_steps=6")) == 0
    ref = tmp_path / ref_name
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in _train_rows(ref)], abs=1e-6)
    resumed_w, whole_w = load_file(run / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert resumed_w.keys() == whole_w.keys()
    for key in whole_w:
        torch.testing.assert_close(resumed_w[key], whole_w[key], rtol=0, atol=1e-6, msg=key)
    resumed_s, whole_s = _deepspeed_state(run / "checkpoint_step0000006"), _deepspeed_state(ref / "checkpoint_step0000006")
    assert resumed_s.keys() == whole_s.keys() and any("optim" in k for k in whole_s)
    for key in whole_s:
        torch.testing.assert_close(resumed_s[key], whole_s[key], rtol=0, atol=1e-6, msg=key)

    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # it learns
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["mfu"] > 0 for r in rows)
    checkpoints = sorted(p.name for p in run.glob("checkpoint_step*"))
    assert checkpoints == ["checkpoint_step0000003", "checkpoint_step0000006"]
    state = json.loads((run / "checkpoint_step0000006" / "train_state.json").read_text())
    assert state["state"]["step"] == 6

    # The exported model is a plain HF folder.
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.vocab_size == len(tok)
    assert (run / "plots" / "loss.png").stat().st_size > 1000

    # evaluate.py scores the held-out file with the same code as the in-training eval.
    final_eval = history[-1]
    capsys.readouterr()
    assert job_main("evaluate")(["perplexity", "--model", str(run / "model"), "--data", str(run / "heldout/abstracts.jsonl"),
                              "--format", "jsonl", "--seq-len", "64", "--max-sequences", "8"]) == 0
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert offline["tokens"] == 8 * 63
    assert offline["loss"] == pytest.approx(final_eval["eval/abstracts/loss"], rel=1e-5)
    assert offline["perplexity"] == pytest.approx(final_eval["eval/abstracts/perplexity"], rel=1e-4)

    # Same run, more steps: it resumes from step 6 and trains only steps 7-9.
    assert job_main("pretrain")(_pretrain_args(tmp_path, shared_data, name, "train.max_steps=9")) == 0
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 10))
    evals_at_0 = [r for r in json.loads((run / "metrics.json").read_text()) if r["step"] == 0]
    assert len(evals_at_0) == 1  # evaluated before training once, not again on resume
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == ["checkpoint_step0000006", "checkpoint_step0000009"]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and len(record["attempts"]) == 2  # the same run, submitted twice


# --- federation --------------------------------------------------------------------------


def _rounds_so_far(storage: Path) -> list[dict]:
    """The round rows of the federation's last checkpoint (written whole, replaced atomically)."""
    for state in storage.glob("federated-*/checkpoint/state.json"):
        try:
            return json.loads(state.read_text())["log"]
        except (OSError, json.JSONDecodeError):  # replaced while read: the next poll sees it
            return []
    return []


def test_a_hospital_node_goes_its_client_drops_out_and_is_readmitted(cluster_nodes, shared_data, tmp_path) -> None:
    cluster = cluster_nodes
    hospitals = {h: cluster.add_node(num_cpus=1, resources={h: 1}) for h in ("hospital_a", "hospital_b", "hospital_c")}
    cluster.wait_for_nodes()
    sites = ", ".join(f"{{name: {h}, modalities: [image], resources: {{{h}: 1}}}}" for h in hospitals)
    # The federation is a driver of its own, as `ray job submit` runs it; this process adds
    # and removes nodes (Ray's node handles belong to the process that started them).
    log = tmp_path / "federated.log"
    with log.open("w") as out:
        job = subprocess.Popen(
            [sys.executable, str(REPO / "jobs/federated.py"), "--config",
             str(REPO / "jobs/configs/federated/tiny_pneumonia_fedavg.yaml"), f"run.storage={tmp_path}",
             f"data_root={shared_data}", f"clients.sites=[{sites}]", "clients.min_per_round=2", "rounds=9",
             "pool.actors=1", "pool.resources={federated_pool: 1}", "pool.site_wait_s=5", "bootstrap=20"],
            cwd=REPO, env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len(_rounds_so_far(tmp_path)) >= 1, timeout=240, what="round 1")
            cluster.remove_node(hospitals["hospital_b"], allow_graceful=False)
            wait_for(lambda: any(r.get("dropped", {}).get("hospital_b") == "site unavailable"
                                 for r in _rounds_so_far(tmp_path)), timeout=120, what="a round without hospital_b")
            cluster.add_node(num_cpus=1, resources={"hospital_b": 1})
            code = job.wait(timeout=200)
        finally:
            job.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    (run,) = tmp_path.glob("federated-*")
    rows = json.loads((run / "rounds.json").read_text())["rounds"]
    assert len(rows) == 9 and not any(r.get("skipped") for r in rows), text[-3000:]
    assert rows[0]["participants"] == ["hospital_a", "hospital_b", "hospital_c"]
    gone = [r["round"] for r in rows if r["dropped"].get("hospital_b") == "site unavailable"]
    back = [r["round"] for r in rows if "hospital_b" in r["participants"] and gone and r["round"] > gone[-1]]
    assert gone and back, rows
    # The others carried every round, the lost site's included.
    assert all({"hospital_a", "hospital_c"} <= set(r["participants"]) for r in rows)
    assert "site hospital_b does not answer" in text and "site hospital_b answers again; re-admitted" in text


# --- serving -----------------------------------------------------------------------------


def test_serve_keeps_answering_when_a_replica_node_goes(cluster_nodes, minilm_dir, tmp_path) -> None:
    cluster = cluster_nodes
    from ray import serve

    from ray_med.adapters.classifier import save_classifier
    from ray_med.adapters.config import AdapterConfig
    from ray_med.adapters.stacking import ClassifierSpec, build_classifier
    from ray_med.models import load_base_model
    from ray_med.serving.client import call
    from ray_med.serving.deploy import read_serve_config, running, with_args

    spec = ClassifierSpec(num_labels=3, labels=["yes", "no", "maybe"], pooling="mean",
                          downstream=AdapterConfig(method="lora", r=4, target_modules=["query", "value"]))
    folder = save_classifier(build_classifier(load_base_model(str(minilm_dir)), spec), spec, tmp_path / "triage",
                             str(minilm_dir))
    serving = [cluster.add_node(num_cpus=1, resources={"serve": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    config = with_args(read_serve_config(REPO / "cluster/serve/tiny.yaml"), model="", adapters={},
                       classifiers={"triage": str(folder)}, log_level="ERROR",
                       gateway={"min_replicas": 2, "max_replicas": 2, "max_replicas_per_node": 1,
                                "num_cpus": 0.5, "resources": {"serve": 1}})

    def running_replicas() -> int:
        app = serve.status().applications.get("ray_med")
        if app is None:
            return 0
        return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())

    with running(config) as url:
        assert running_replicas() == 2
        stop = threading.Event()
        log: list[tuple[float, int]] = []

        def client() -> None:
            while not stop.is_set():
                try:
                    status, body = call(url, "/v1/classify", {"text": "Is aspirin useful?", "adapter": "triage"},
                                        timeout=30)
                except OSError:  # the connection dropped (the proxy lost the replica mid-request)
                    status, body = 0, {}
                log.append((time.monotonic(), status))
                assert status != 200 or body["label"] in {"yes", "no", "maybe"}

        with ThreadPoolExecutor(2) as pool:
            clients = [pool.submit(client) for _ in range(2)]
            try:
                time.sleep(5)
                lost_at = time.monotonic()
                cluster.remove_node(serving[0], allow_graceful=False)
                time.sleep(10)  # the surviving replica serves alone: its peer has no node to go to
                cluster.add_node(num_cpus=1, resources={"serve": 1})
                wait_for(lambda: running_replicas() == 2, timeout=120, what="the replacement replica")
                time.sleep(3)
            finally:
                stop.set()  # the clients end whatever happened above
            for c in clients:
                c.result()
    errors = [t for t, s in log if s != 200]
    after = [s for t, s in log if t > lost_at]
    print(f"serve node loss: {len(errors)} of {len(log)} requests failed ({len(after)} after the loss)")
    assert len(log) > 20 and len(after) > 10, len(log)
    assert len(errors) <= SERVE_ERROR_BOUND, f"{len(errors)} of {len(log)} requests failed"
    assert all(s == 200 for t, s in log if t > lost_at + 5)  # the other replica answers on
