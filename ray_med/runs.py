"""Run records and the run index: what ran, with which config, how it ended, what it produced and from what.

Every job that owns a run folder keeps a ``run.json`` there (written by
:func:`ray_med.cli.run_job` through :func:`begin` and :func:`end`):

* ``job``, ``config_hash`` (the hash in the run's name) and the ``overrides`` it was given;
* ``status``: ``running``, ``finished``, ``failed`` or ``interrupted``, with one entry per
  attempt (start, end, host, pid, error);
* ``outputs``: the job's typed outputs record, and its headline metric;
* ``inputs``: lineage, the config keys that point into another run's folder under the
  same storage (``model.path`` -> ``pretrain-1a2b3c4d``);
* ``stage_key``: set when a pipeline stage ran it (the pipeline's cache key).

:func:`list_runs` reads them back for ``python jobs/runs.py``, which tells a finished run
from a failed one, one still running, and one that can be resumed from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ray_med.config import config_hash, from_dict, to_dict
from ray_med.runtime import RunContext, RuntimeConfig, Storage

RECORD = "run.json"


@dataclass
class RunRecord:
    """The contents of a run's ``run.json``."""

    job: str
    name: str
    config_hash: str
    status: str = "running"
    overrides: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    """Config key -> the run (under the same storage) whose output it reads."""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Any] | None = None
    outputs_type: str | None = None
    headline: dict[str, Any] | None = None
    stage_key: str | None = None


def _inputs(cfg: Any, storage: Storage, own: str) -> dict[str, str]:
    """Config keys whose value is a path inside another run folder of ``storage``."""
    root = storage.uri.rstrip("/") + "/"
    found: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        elif isinstance(node, str):
            path = node if "://" in node else os.path.abspath(os.path.expanduser(node))
            if path.startswith(root):
                run = path[len(root):].split("/", 1)[0]
                if run and run != own:
                    found[key] = run

    walk(to_dict(cfg), "")
    return found


def begin(ctx: RunContext, cfg: Any, *, overrides: list[str] = (), stage_key: str | None = None) -> RunRecord:
    """Record that a run starts (a new attempt of an existing run keeps its earlier attempts)."""
    previous = read_record(ctx.storage, ctx.name)
    record = RunRecord(
        job=ctx.job, name=ctx.name, config_hash=config_hash(cfg, exclude=("run",)), overrides=list(overrides),
        inputs=_inputs(cfg, ctx.storage, ctx.name), stage_key=stage_key,
        attempts=list(previous.attempts) if previous else [],
    )
    record.attempts.append({"started": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    _write(ctx, record)
    return record


def end(ctx: RunContext, record: RunRecord, *, outputs: Any = None, error: BaseException | None = None) -> None:
    """Record how the run ended: its outputs, or the error that stopped it."""
    attempt = record.attempts[-1]
    attempt["ended"] = time.time()
    if error is None:
        record.status = "finished"
        if outputs is not None:
            record.outputs = to_dict(outputs)
            record.outputs_type = type(outputs).__name__
            if hasattr(outputs, "headline"):
                name, value = outputs.headline()
                record.headline = {"name": name, "value": value}
    else:
        record.status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        attempt["error"] = f"{type(error).__name__}: {error}"[:500]
    attempt["status"] = record.status
    _write(ctx, record)


def _write(ctx: RunContext, record: RunRecord) -> None:
    ctx.write_text(RECORD, json.dumps(dataclasses.asdict(record), indent=1, default=str) + "\n")


def read_record(storage: Storage, name: str) -> RunRecord | None:
    """The record of run ``name``, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads(storage.read_text(f"{name}/{RECORD}"))
        return RunRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def outputs_of(record: RunRecord, cls: type) -> Any:
    """The typed outputs record of a finished run."""
    return from_dict(cls, record.outputs or {}, where=f"{record.name}/{RECORD}")


# --------------------------------------------------------------------------- the index


@dataclass
class RunsConfig:
    """Which runs to list."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """run.storage is the storage root to list."""
    job: str | None = None
    """Only runs of this job (e.g. pretrain)."""
    json: bool = False
    """Print one JSON object per run instead of a table."""


def _alive(attempt: dict[str, Any]) -> bool | None:
    """Whether an attempt's process still runs (None: it ran on another host)."""
    if attempt.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(attempt["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False
    return True


def _has_checkpoint(storage: Storage, name: str) -> bool:
    return any(entry.startswith("checkpoint_") for entry in storage.list_dir(name))


def status_of(storage: Storage, record: RunRecord) -> str:
    """finished, failed, running, or resumable (stopped, with a checkpoint to resume from)."""
    status = record.status
    if status == "running" and record.attempts and _alive(record.attempts[-1]) is False:
        status = "interrupted"
    if status in ("failed", "interrupted") and _has_checkpoint(storage, record.name):
        return "resumable"
    return status


def list_runs(cfg: RunsConfig) -> list[dict[str, Any]]:
    """One row per run under ``cfg.run.storage``: job, config hash, overrides, status, headline, lineage."""
    storage = Storage.parse(cfg.run.storage)
    rows = []
    for name in sorted(storage.list_dir("")):
        record = read_record(storage, name)
        if record is None or (cfg.job and record.job != cfg.job):
            continue
        started = [a["started"] for a in record.attempts if "started" in a]
        rows.append({
            "run": record.name, "job": record.job, "config_hash": record.config_hash,
            "overrides": record.overrides, "status": status_of(storage, record), "attempts": len(record.attempts),
            "headline": record.headline, "inputs": record.inputs,
            "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started[-1])) if started else "",
        })
    return rows


def format_runs(rows: list[dict[str, Any]]) -> str:
    """The run index as a markdown table."""
    lines = ["| run | job | status | started | headline | from | overrides |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        head = r["headline"] or {}
        value = head.get("value")
        shown = f"{head.get('name')} {value:.4g}" if isinstance(value, (int, float)) else ""
        origin = ", ".join(sorted(set(r["inputs"].values())))
        lines.append(f"| {r['run']} | {r['job']} | {r['status']} | {r['started']} | {shown} | {origin} | "
                     f"{' '.join(r['overrides'])} |")
    return "\n".join(lines)


@dataclass
class RunsOutputs:
    """The listed runs."""

    runs: list[dict[str, Any]] = field(default_factory=list)


def run_index(cfg: RunsConfig) -> RunsOutputs:
    """Print the runs under ``run.storage`` (the ``runs`` job)."""
    rows = list_runs(cfg)
    if cfg.json:
        for row in rows:
            print(json.dumps(row))
    elif rows:
        print(format_runs(rows))
    else:
        print(f"no runs under {Storage.parse(cfg.run.storage).uri}")
    return RunsOutputs(rows)
