"""Running the pipeline: each stage's job in order, reused when an earlier run finished it with the same key.

A stage runs its own job config (``pretrain.config`` names ``jobs/configs/pretrain/tiny.yaml``),
with the hand-off from earlier stages and then its own overrides applied, on the
pipeline's storage, seed and Ray. Its run folder is the one the job would use alone
(``<job>-<config hash>``), so ``python jobs/runs.py`` lists it and a resubmitted stage
resumes from its checkpoints. ``summary.json`` in the pipeline's run folder ties the
stages' folders together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from ray_med.config import load_config, to_dict
from ray_med.corpus.config import CorpusJobConfig
from ray_med.errors import ConfigError
from ray_med.pipeline.cache import reusable, stage_key
from ray_med.pipeline.config import PipelineConfig, PipelineOutputs
from ray_med.pipeline.stages import STAGES, Stage
from ray_med.registry import execute, get_job
from ray_med.runs import outputs_of, read_record
from ray_med.runtime import RunContext, is_complete, run_name

log = logging.getLogger("ray_med.pipeline")


def _stage_config(stage: Stage, cfg: PipelineConfig, upstream: dict[str, Any], resolved: dict[str, Any]) -> tuple[Any, list[str]]:
    """The stage's job config: its YAML, then the hand-off, then its own overrides, on the pipeline's run settings."""
    job = get_job(stage.job)
    if stage.name == "data":
        # The data stage is configured inline (corpus, tokenizer, seq_len): its documents held
        # out of tokenizer training are pretraining's held-out documents.
        pretrain = resolved.get("pretrain")
        heldout = pretrain.eval.heldout_fraction if pretrain is not None else 0.05
        scfg: Any = CorpusJobConfig(corpus=cfg.corpus, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len,
                                    heldout_fraction=heldout)
        overrides: list[str] = []
    else:
        section = getattr(cfg, stage.name)
        overrides = [*stage.handoff(cfg, upstream), *section.overrides]
        scfg = load_config(job.config, section.config or None, overrides)
    scfg.run = dataclasses.replace(scfg.run, storage=cfg.run.storage, seed=cfg.run.seed,
                                   ray_address=cfg.run.ray_address, num_cpus=cfg.run.num_cpus,
                                   log_level=cfg.run.log_level, name=None)
    return scfg, overrides


def _preview(stage: Stage, cfg: PipelineConfig) -> Any:
    """A stage's config before the hand-off (what the data stage needs to know of pretraining)."""
    section = getattr(cfg, stage.name)
    return load_config(get_job(stage.job).config, section.config or None, section.overrides)


def reused(stage: Stage, job: Any, record: Any, key: str) -> Any:
    """The typed outputs of a finished run of ``stage`` with ``key``, if every folder they name is complete."""
    if not reusable(record, key):
        return None
    outputs = outputs_of(record, job.outputs)
    incomplete = [p for p in stage.artifacts(outputs) if not is_complete(p)]
    if incomplete:
        print(f"rerun: {', '.join(incomplete)} is missing or incomplete (a save that did not finish)")
        return None
    return outputs


def run_pipeline(cfg: PipelineConfig, ctx: RunContext) -> PipelineOutputs:
    """Run every enabled stage (or reuse its finished run); print each one's tables; write summary.json."""
    cfg.corpus.check()
    resolved: dict[str, Any] = {}
    if cfg.pretrain.enabled:
        resolved["pretrain"] = _preview(next(s for s in STAGES if s.name == "pretrain"), cfg)
    upstream: dict[str, Any] = {}
    keys: dict[str, str] = {}
    summary: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        section = getattr(cfg, stage.name, None)
        if section is not None and not section.enabled:
            continue
        missing = [n for n in stage.needs if n not in upstream]
        if missing:
            print(f"\n== stage: {stage.name} == skipped: it needs {', '.join(missing)}")
            continue
        job = get_job(stage.job)
        scfg, overrides = _stage_config(stage, cfg, upstream, resolved)
        inputs = {n: keys[n] for n in stage.uses if n in keys}
        key = stage_key(stage.job, scfg, inputs)
        name = run_name(job.run_prefix(scfg), scfg, scfg.run)
        print(f"\n== stage: {stage.name} ==")
        outputs = reused(stage, job, read_record(ctx.storage, name), key)
        cached = outputs is not None
        if cached:
            print(f"cached: {ctx.storage.join(name)}  (finished earlier with the same config and inputs)")
        else:
            outputs = execute(job, scfg, overrides=overrides, stage_key=key)
        stage.show(outputs, cached)
        upstream[stage.name], keys[stage.name] = outputs, key
        summary[stage.name] = {"job": stage.job, "run": name, "run_dir": ctx.storage.join(name), "key": key,
                               "cached": cached, "inputs": inputs, "overrides": overrides,
                               "headline": dict(zip(("name", "value"), outputs.headline(), strict=True))
                               if hasattr(outputs, "headline") else None}
    if not upstream:
        raise ConfigError("every stage is disabled: enable at least one (e.g. pretrain.enabled=true)")
    ctx.write_text("summary.json", json.dumps({"pipeline": ctx.name, "stages": summary}, indent=2, default=str) + "\n")
    print(f"\npipeline:    {ctx.dir}  (summary.json lists every stage's run folder)")
    return PipelineOutputs(run_dir=ctx.dir, stages={n: {**s, "outputs": to_dict(upstream[n])}
                                                     for n, s in summary.items()})
