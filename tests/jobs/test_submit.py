"""The README's cluster commands, as written, against a local `ray start --head` cluster.

The README's block (the exports, then `ray job submit ... jobs/pipeline.py ...`) is read
from the README and run with the local head's address and token, the shared data for
`/mnt/data` and a local folder for `s3://bucket/runs`. The pipeline runs its data and
pretraining stages, pretraining in Ray Train's local mode (``scaling.num_workers=0``):
what is tested here is the submission (working directory, runtime env, the head's
Python, token auth, paths); worker groups, restarts and checkpoints are
tests/jobs/test_pretrain.py's, S3 is tests/jobs/test_storage.py's. The same command with
a relative ``run.storage`` fails at once with one line.
"""

from __future__ import annotations

import os
import re
import shlex
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


def readme_cluster_commands() -> tuple[dict[str, str], list[str]]:
    """The exports and the `ray job submit` command of the README's cluster block."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "export RAY_AUTH_MODE" in b and "jobs/pipeline.py" in b]
    exports, command = {}, None
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            key, _, value = words[1].partition("=")
            exports[key] = value
        elif words[:3] == ["ray", "job", "submit"]:
            command = words
    assert command is not None, block
    return exports, command


def _submit(command: list[str], env: dict[str, str]) -> str:
    # The job API answers before the head's dashboard agent registers; until then a
    # submission is refused without starting anything, so retrying is safe.
    for _ in range(30):
        submit = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        log = submit.stdout + submit.stderr
        if "No available agent to submit job" not in log:
            return log
        time.sleep(2)
    return log


def test_readme_cluster_commands(shared_data: Path, tmp_path: Path) -> None:
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
        exports, command = readme_cluster_commands()
        assert set(exports) == {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
        assert exports["RAY_AUTH_MODE"] == "token"
        # This head's address, and its token (`ray start` made ~/.ray/auth_token if there was none).
        env = {**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": exports["RAY_AUTH_MODE"],
               "RAY_AUTH_TOKEN": (Path.home() / ".ray" / "auth_token").read_text().strip()}
        assert "corpus.root=/mnt/data" in command and "run.storage=s3://bucket/runs" in command
        storage = tmp_path / "runs"

        # As written but with a relative run.storage: one line, exit 2, before any work.
        relative = [("run.storage=runs" if a.startswith("run.storage=") else
                     f"corpus.root={shared_data}" if a.startswith("corpus.root=") else a) for a in command]
        log = _submit(relative, env)
        assert "failed" in log.lower() and "Traceback" not in log, log[-4000:]
        assert "error: run.storage='runs' is relative, and this job runs under `ray job submit`" in log, log[-4000:]

        # As written, on this machine's data and storage; the data and pretraining stages, small.
        command = [f"corpus.root={shared_data}" if a == "corpus.root=/mnt/data" else
                   f"run.storage={storage}" if a == "run.storage=s3://bucket/runs" else a for a in command]
        command += [
            "tokenizer.vocab_size=512", "domain.enabled=false", "downstream.enabled=false", "serve.enabled=false",
            "multimodal.enabled=false", "serve_vlm.enabled=false", "federated.enabled=false",
            "inject.enabled=false", "sweep.enabled=false",
            "pretrain.overrides=[train.max_steps=4, train.seq_len=64, train.log_every=1, checkpoint.every_steps=2, "
            "eval.every_steps=100, eval.max_sequences=4, scaling.num_workers=0]",
        ]
        log = _submit(command, env)
        assert "succeeded" in log.lower(), log[-4000:]
        assert "pretraining finished at step 4" in log
        assert all(f"== stage: {s} ==" not in log for s in ("domain", "multimodal", "federated"))
        (model,) = storage.glob("pretrain-*/model")
        assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
        assert not list(storage.glob("*/*.tmp-*"))  # every output was renamed into place
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
