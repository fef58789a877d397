"""The end-to-end pipeline that ``make demo`` runs, one stage after another.

Stages so far:

1. **corpus**: read every source as a Ray task into the uniform record schema and
   write it as Parquet under ``<run>/corpus/``;
2. **tokenizer**: train the tiny preset's byte-level BPE tokenizer on the corpus text
   and save it in Hugging Face format under ``<run>/tokenizer/``;
3. **report**: count records, tokens, images and packed sequences per source with
   Ray Data and write ``data_report.json`` / ``data_report.md``;
4. **pretrain**: continued pretraining of the tiny preset on Ray Train + DeepSpeed
   (its own job config, ``jobs/configs/pretrain/tiny.yaml``), then held-out perplexity
   per source before and after;
5. **domain**: a stage-1 domain LoRA on the MTSamples notes over the pretrained model;
6. **downstream**: a stage-2 downstream LoRA + head on PubMedQA (reasoning-free), with
   the domain adapter stacked under it, and a metrics table;
7. **serve**: the Serve app of ``cluster/serve/tiny.yaml`` on this run's model, domain
   adapter and classifier; one request to every endpoint, answers printed, and the
   filled-in Serve config written to ``<storage>/serve_tiny.yaml`` for ``serve run``.

Each stage after the first keeps its own job config file, so the demo runs exactly
what ``jobs/<stage>.py`` runs; the pipeline only points it at the same data root and
storage. Later stages (adapters, federated injection, serving) add themselves here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ray_med.data.config import CorpusConfig
from ray_med.errors import ConfigError
from ray_med.models.config import TokenizerConfig
from ray_med.runtime import RuntimeConfig, init_ray, start_run

log = logging.getLogger("ray_med.pipeline")


@dataclass
class StageConfig:
    """A later stage of the pipeline, run from its own job config."""

    enabled: bool = True
    """Run this stage."""
    config: str = ""
    """The stage's job config file (YAML)."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides applied to that config."""


@dataclass
class ServeStageConfig:
    """The demo deployment: the Serve app on this run's outputs, queried once per endpoint."""

    enabled: bool = True
    """Run this stage (needs pretrain; uses the adapter stages' outputs when they ran)."""
    config: str = "cluster/serve/tiny.yaml"
    """Serve config file; its first application's args are used with this run's folders."""
    port: int = 0
    """HTTP port while the demo runs (0: a free port)."""


@dataclass
class PipelineConfig:
    """The demo pipeline: corpus, tokenizer and data report, then pretraining."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Run name, storage, seed, logging and Ray connection."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The sources to read."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer training settings."""
    seq_len: int = 256
    """Sequence length that packed-sequence counts are reported for."""
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(config="jobs/configs/pretrain/tiny.yaml"))
    """Continued pretraining of the tiny preset."""
    domain: StageConfig = field(default_factory=lambda: StageConfig(config="jobs/configs/finetune/tiny_domain.yaml"))
    """Stage-1 domain adapter on the pretrained model (needs pretrain)."""
    downstream: StageConfig = field(
        default_factory=lambda: StageConfig(config="jobs/configs/finetune/tiny_downstream.yaml")
    )
    """Stage-2 downstream adapter + classifier (needs pretrain; stacks domain's adapter when it ran)."""
    serve: ServeStageConfig = field(default_factory=ServeStageConfig)
    """Deploy the results with Ray Serve and query every endpoint once."""


@dataclass
class PipelineResult:
    """Where the pipeline put things, and the data report."""

    run_dir: str
    tokenizer_dir: str
    report_path: str
    report: dict[str, Any]
    pretrain: Any = None
    """The pretraining stage's result, when it ran."""
    domain: Any = None
    """The domain-adapter stage's result, when it ran."""
    downstream: Any = None
    """The downstream stage's result, when it ran."""
    serve: Any = None
    """The serve stage's responses (one per endpoint), when it ran."""


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Run every stage of the pipeline and print where the outputs are."""
    from ray_med.corpus import read_corpus, token_report
    from ray_med.models import train_bpe_tokenizer

    cfg.corpus.check()
    ctx = start_run("pipeline", cfg, cfg.run)
    resources = init_ray(cfg.run)
    log.info("Ray resources: %s", {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})

    sources = read_corpus(cfg.corpus, ctx)

    texts = (t for d in sources.values() for t in d.table.column("text").to_pylist() if t)
    with ctx.local_dir("tokenizer") as tok_dir:
        tokenizer = train_bpe_tokenizer(
            texts, vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency, out_dir=tok_dir
        )
    per_source = token_report(sources, tokenizer, cfg.seq_len)
    tokenizer_dir = ctx.path("tokenizer")

    report = {
        "run": ctx.name,
        "seq_len": cfg.seq_len,
        "tokenizer": {"path": tokenizer_dir, "vocab_size": len(tokenizer)},
        "sources": per_source,
        "total": {
            k: sum(s[k] for s in per_source.values())
            for k in ("records", "skipped", "text_records", "tokens", "images", "sequences")
        },
    }
    report_path = ctx.write_text("data_report.json", json.dumps(report, indent=2) + "\n")
    table = format_report(report)
    ctx.write_text("data_report.md", table + "\n")
    print(table)
    print(f"\nrun folder:  {ctx.dir}")
    print(f"corpus:      {ctx.path('corpus')}/<source>.parquet")
    print(f"tokenizer:   {tokenizer_dir}  (an HF folder: transformers' AutoTokenizer loads it)")
    print(f"data report: {report_path}")
    result = PipelineResult(run_dir=ctx.dir, tokenizer_dir=tokenizer_dir, report_path=report_path, report=report)
    if cfg.pretrain.enabled:
        result.pretrain = _pretrain_stage(cfg)
        result.domain, result.downstream = _adapter_stages(cfg, result.pretrain.model_dir)
        if cfg.serve.enabled:
            result.serve = _serve_stage(cfg, result)
    return result


def _serve_stage(cfg: PipelineConfig, result: PipelineResult) -> list[dict[str, Any]]:
    """Deploy this run's model, domain adapter and classifier; one request per endpoint."""
    import os

    from ray_med.data import read_records
    from ray_med.data.tasks import get_task, task_data
    from ray_med.serving.client import demo_requests, summarize
    from ray_med.serving.deploy import read_serve_config, running, with_args, write_serve_config

    print("\n== stage: serve ==")
    adapters = {"mtsamples": os.path.abspath(result.domain.adapter_dir)} if result.domain else {}
    classifiers = {"pubmedqa_rf": os.path.abspath(result.downstream.adapter_dir)} if result.downstream else {}
    config = with_args(read_serve_config(cfg.serve.config), model=os.path.abspath(result.pretrain.model_dir),
                       adapters=adapters, classifiers=classifiers)
    # A real PubMedQA item: its question and abstract for QA, question + conclusion to classify.
    source = next((s for s in cfg.corpus.sources if s.reader == "pubmedqa"), None)
    if source is None:
        raise ConfigError("the serve stage asks a PubMedQA question: add a pubmedqa source to the corpus")
    records = read_records("pubmedqa", cfg.corpus.resolve(source)).records
    item = records[0]
    rf = task_data(get_task("pubmedqa_rf"), records[:1])
    with running(config, port=cfg.serve.port or None) as url:
        rows = demo_requests(url, question=item.question, context=item.context, classify_text=rf.texts[0],
                             classify_pair=rf.pairs[0] if rf.pairs else None,
                             classifier=next(iter(classifiers), ""), adapter=next(iter(adapters), None))
    print(f"served at {url} (PubMedQA {item.id}: {item.question!r}, gold answer {item.answer})")
    for row in rows:
        print(f"  {row['endpoint']:<22} {summarize(row)}")
    if cfg.run.storage and "://" not in cfg.run.storage:
        written = write_serve_config(config, os.path.join(cfg.run.storage, "serve_tiny.yaml"))
        print(f"serve config: {written}  (run it: serve run {written})")
    return rows


def _stage_config(cls: type, stage: StageConfig, cfg: PipelineConfig, extra: list[str]) -> Any:
    """A stage's own job config (``extra`` then the stage's overrides), on the pipeline's storage, seed and Ray."""
    from dataclasses import replace

    from ray_med.config import load_config

    scfg = load_config(cls, stage.config, [*extra, *stage.overrides])
    scfg.run = replace(scfg.run, storage=cfg.run.storage, seed=cfg.run.seed, ray_address=cfg.run.ray_address)
    return scfg


def _adapter_stages(cfg: PipelineConfig, model_dir: str) -> tuple[Any, Any]:
    """Stage 1 then stage 2 of adapter fine-tuning, on the model pretraining just wrote."""
    from ray_med.training.finetune import FinetuneConfig, run_finetune

    domain = downstream = None
    shared = [f"model.path={model_dir}", "model.preset=null"]
    if cfg.domain.enabled:
        print("\n== stage: domain adapter ==")
        fcfg = _stage_config(FinetuneConfig, cfg.domain, cfg, shared)
        fcfg.corpus.root = cfg.corpus.root
        domain = run_finetune(fcfg)
    if cfg.downstream.enabled:
        print("\n== stage: downstream adapter + classifier ==")
        extra = [f"domain_adapter={domain.adapter_dir}"] if domain is not None else ["domain_adapter=null"]
        fcfg = _stage_config(FinetuneConfig, cfg.downstream, cfg, [*shared, *extra])
        fcfg.data.root = cfg.corpus.root
        downstream = run_finetune(fcfg)
        print(format_classifier(downstream.metrics))
    return domain, downstream


def format_classifier(m: dict[str, Any]) -> str:
    """The downstream stage's dev metrics as a markdown table."""
    lines = [f"\n{m['task']} dev metrics ({m['n']} examples, {m['trainable']:,} trainable parameters):", "",
             "| metric | value | 95% CI |", "|---|---|---|"]
    for key in ("auroc_macro", "auprc_macro", "f1_macro", "accuracy"):
        lo, hi = m[f"{key}_ci"]
        lines.append(f"| {key} | {m[key]:.4f} | [{lo:.4f}, {hi:.4f}] |")
    return "\n".join(lines)


def _pretrain_stage(cfg: PipelineConfig) -> Any:
    """Run the pretraining job's own config on the pipeline's data root and storage."""
    from ray_med.training.config import PretrainConfig
    from ray_med.training.pretrain import run_pretrain

    print("\n== stage: pretrain ==")
    pcfg = _stage_config(PretrainConfig, cfg.pretrain, cfg, [])
    pcfg.corpus.root = cfg.corpus.root
    result = run_pretrain(pcfg)
    print(format_perplexity(result.history))
    return result


def format_perplexity(history: list[dict[str, Any]]) -> str:
    """Held-out perplexity per source, before the first and after the last step."""
    evals = [r for r in history if any(k.startswith("eval/") for k in r)]
    if not evals:
        return "(no held-out evaluation)"
    first, last = evals[0], evals[-1]
    names = sorted({k.split("/")[1] for k in last if k.startswith("eval/")})
    lines = [
        f"\nheld-out perplexity, step {first['step']} -> step {last['step']}:",
        "",
        "| source | before | after |",
        "|---|---|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {first[f'eval/{n}/perplexity']:.1f} | {last[f'eval/{n}/perplexity']:.1f} |")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The data report as a markdown table."""
    cols = ("reader", "records", "skipped", "text_records", "tokens", "images", "sequences")
    head = "| source | " + " | ".join(cols) + " |"
    lines = [
        f"Data report for run {report['run']} (tokenizer vocab {report['tokenizer']['vocab_size']}, "
        f"sequences of {report['seq_len']} tokens)",
        "",
        head,
        "|" + "---|" * (len(cols) + 1),
    ]
    for name, row in report["sources"].items():
        lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")
    total = report["total"]
    lines.append("| **total** | | " + " | ".join(str(total[c]) for c in cols[1:]) + " |")
    for name, row in report["sources"].items():
        if row["skipped"]:
            lines.append(f"\n{name}: skipped {row['skipped']} malformed records, e.g. {row['skip_reasons'][0]}")
    return "\n".join(lines)

