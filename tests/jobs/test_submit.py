"""`ray job submit` of the tiny pretraining job to a local `ray start --head` cluster.

The submitted job trains in Ray Train's local mode (``scaling.num_workers=0``): what is
tested here is the submission (working directory, runtime env, the head's Python, token
auth); worker groups, restarts and checkpoints are tests/jobs/test_pretrain.py's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ray_med.runtime import free_port

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.submit, pytest.mark.slow, pytest.mark.deepspeed]


def test_ray_job_submit_pretrain(shared_data: Path, tmp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)
    ray = str(Path(bin_dir) / "ray")
    # The entrypoint's `python` is whatever is first on the head node's PATH: the project venv.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    # Every fixed default port gets a free one: the test session's own local Ray (started
    # by other tests) already holds the defaults, e.g. the dashboard agent's 52365, and a
    # head whose agent cannot bind refuses every job ("No available agent").
    ports = {
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    # A short private temp dir: Ray's unix socket paths must stay under ~107 characters,
    # and the test session's own local Ray must not be touched (so no `ray stop`).
    temp_dir = tempfile.mkdtemp(prefix="rmh", dir="/tmp")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         *(f"{flag}={value}" for flag, value in ports.items())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            probe = subprocess.run([ray, "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, f"the head never answered: {probe.stderr[-2000:]}"
            time.sleep(2)
        command = [
            ray, "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--runtime-env", str(REPO / "cluster/runtime_env.yaml"), "--",
             "python", "jobs/pretrain.py", "--config", "jobs/configs/pretrain/tiny.yaml",
             f"corpus.root={shared_data}", f"run.storage={tmp_path}", "run.name=submitted",
             "train.max_steps=4", "train.seq_len=64", "train.log_every=1", "tokenizer.vocab_size=512",
             "checkpoint.every_steps=2", "eval.every_steps=100", "eval.max_sequences=4", "scaling.num_workers=0",
        ]
        # The job API answers before the head's dashboard agent registers; until then a
        # submission is refused without starting anything, so retrying is safe.
        for _ in range(30):
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
            log = submit.stdout + submit.stderr
            if "No available agent to submit job" not in log:
                break
            time.sleep(2)
        assert "succeeded" in log.lower(), log[-4000:]
        assert "pretraining finished at step 4" in log
        assert (tmp_path / "submitted" / "model" / "model.safetensors").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
