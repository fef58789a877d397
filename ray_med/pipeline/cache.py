"""Stage keys: a stage's outputs are keyed by its job, its resolved config and its inputs' keys (pure).

A rerun of the pipeline finds a stage's run folder by its config (the run's name is
``<job>-<config hash>``, as when the job runs alone) and reuses it when the run finished
with the same key. A changed override changes that stage's config, so its key, so the
keys of every stage after it (their inputs' keys changed): exactly those rerun, and
nothing before them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ray_med.config import config_hash


def stage_key(job: str, cfg: Any, inputs: Mapping[str, str]) -> str:
    """The key of a stage running ``job`` on ``cfg`` after the stages whose keys are ``inputs``."""
    blob = json.dumps({"job": job, "config": config_hash(cfg, exclude=("run",)), "inputs": dict(sorted(inputs.items()))},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def reusable(record: Any, key: str) -> bool:
    """Whether a run record (``ray_med.runs.RunRecord``) holds finished outputs for ``key``."""
    return (record is not None and record.status == "finished" and record.stage_key == key
            and record.outputs is not None)
