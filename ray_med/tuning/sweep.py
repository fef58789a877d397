"""The LoRA sweep on Ray Tune over Ray Train V2: the driver of ``jobs/sweep.py``.

Ray 2.60 runs Train V2, where ``Tuner(TorchTrainer(...))`` raises: each trial is a small
driver function (:func:`_trial`) that loads its config (the base plus its sampled
values, strictly), builds the downstream stage's ``TorchTrainer`` with the shared
builder (:func:`~ray_med.training.trainer.build_trainer`) and fits it. Ray Train's
``TuneReportCallback`` forwards every epoch's report (dev macro AUROC) to Tune, where
ASHA compares trials and stops the weak ones; stopping a trial ends its driver, whose
Train controller and workers go with it.

* **Data once.** A Ray task reads the task's data, splits it (seeded, stratified) and
  tokenizes the three splits once; the result stays in the object store and every
  worker of every trial reads it from there (:class:`PreparedSplits`). The driver
  holds only the split ids and counts.
* **Resources.** A trial's driver asks for no CPU (it only waits); its Train workers ask
  for the base config's ``scaling``. With ``scaling.cpus_per_worker`` unset, each worker
  gets the cluster's CPUs / (concurrent trials x workers).
* **Resume.** Tune's experiment state lives in ``<run dir>/tune`` and each trial's Train
  run in ``<run dir>/train/<trial id>``. Rerunning the same command finds the state and
  calls ``Tuner.restore``: finished trials are kept, and an interrupted trial restarts
  from its Train run's last epoch checkpoint.
* **Failures.** A trial that raises is recorded as failed with its one-line reason and
  the sweep goes on; if every trial fails the job fails with the first error.

After the sweep: ``trials.csv``, ``plots/``, and ``best/`` (the best trial's classifier
folder, its resolved config, a Serve config serving it, its test metrics and splits).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator

from ray_med.config import apply_overrides, format_override, from_dict, to_yaml
from ray_med.data.config import resolve_path
from ray_med.errors import ConfigError, RayMedError
from ray_med.models import load_tokenizer
from ray_med.runtime import RunContext, Storage, init_ray, localize
from ray_med.serving.deploy import read_serve_config, with_args
from ray_med.training.config import FinetuneConfig
from ray_med.training.downstream_worker import DownstreamSpec, downstream_worker, prepare_splits
from ray_med.training.finetune import check_downstream, prepare_downstream
from ray_med.training.trainer import build_trainer, fit
from ray_med.tuning.config import SweepConfig, SweepOutputs, base_overrides
from ray_med.tuning.report import (
    METRIC,
    TrialRow,
    best_trial,
    end_status,
    plot_curves,
    plot_params,
    progress_line,
    row_record,
    summary_table,
    trials_csv,
)
from ray_med.tuning.space import Param, base_data, check_space, grid_size, parse_space, trial_config

log = logging.getLogger("ray_med.sweep")

# A trial's driver only waits on its Train run; Tune needs a non-empty resource request,
# so it asks for a token amount of memory instead of a CPU its workers would then lack.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}
ATTEMPTS_FILE = "attempts"


@dataclass
class TrialPlan:
    """What every trial's driver needs, put in the object store once (``tune.with_parameters``)."""

    base: dict[str, Any]
    """The base fine-tuning config as data (YAML + overrides, paths made absolute)."""
    params: dict[str, Param]
    run: Any
    out: str
    """The sweep's output folder or URI (trials/<id>/ go under it)."""
    train_storage: str
    """Where the trials' Ray Train runs keep their checkpoints."""
    base_path: str
    task_type: str
    ordinal: bool
    n_train: int
    threads: int
    prepared: Any
    """ObjectRef of the PreparedSplits."""


@ray.remote(num_returns=2)
def _prepare(cfg: FinetuneConfig) -> tuple[dict[str, Any], Any]:
    """Read, split and tokenize the task's data once: (what the driver needs, the splits for the workers)."""
    inputs = prepare_downstream(cfg, check=False)
    data, splits = inputs.data, inputs.splits
    tokenizer = load_tokenizer(localize(inputs.base_path))
    prepared = prepare_splits(tokenizer, data.take(splits.train), data.take(splits.dev), data.take(splits.test),
                              cfg.train.max_length)
    meta = {
        "task": inputs.task.name, "task_type": inputs.task.task_type, "ordinal": inputs.task.ordinal,
        "base_path": inputs.base_path, "data_path": inputs.data_path, "splits_json": inputs.splits_json(),
        "domain_adapter": inputs.cfg.domain_adapter,
        "n": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
        "labels": data.labels,
    }
    return meta, prepared


def _trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """One trial: the base config plus ``config``'s sampled values, trained on Ray Train, reported to Tune."""
    # Train's default ingest options (set even without datasets) warn about a renamed field.
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(FinetuneConfig, plan.base, plan.params, config)
    out = Storage.parse(plan.out)
    trial_dir = out.join("trials", trial_id)
    cfg = replace(cfg, run=plan.run, output_dir=trial_dir,
                  scaling=replace(cfg.scaling, cpus_per_worker=cfg.scaling.cpus_per_worker or plan.threads))
    check_downstream(cfg, localize(plan.base_path), plan.n_train)
    attempts_rel = f"trials/{trial_id}/{ATTEMPTS_FILE}"
    try:
        attempts = int(out.read_text(attempts_rel).strip() or 0)
    except (OSError, ValueError, RayMedError):
        attempts = 0
    out.write_text(attempts_rel, f"{attempts + 1}\n")
    spec = DownstreamSpec(cfg=cfg, base_path=plan.base_path, train=None, dev=None, task_type=plan.task_type,
                          ordinal=plan.ordinal, out_dir=trial_dir, threads=cfg.scaling.cpus_per_worker,
                          prepared=plan.prepared)
    ctx = RunContext(job="sweep", name=trial_id, storage=Storage.parse(plan.train_storage))
    trainer = build_trainer(downstream_worker, {"spec": spec}, scaling=cfg.scaling, ctx=ctx,
                            threads=cfg.scaling.cpus_per_worker, keep_checkpoints=cfg.checkpoint.keep,
                            callbacks=[TuneReportCallback()])
    fit(trainer)


class LastEpochASHA(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch: it is finishing anyway, and stopping it there
    would lose the classifier it is about to write."""

    def __init__(self, *, last_epoch: int, **kwargs: Any) -> None:
        super().__init__(max_t=last_epoch, stop_last_trials=False, **kwargs)
        self._last_epoch = last_epoch

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get("training_iteration", 0) >= self._last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def _one_line(error: Any) -> str:
    """The user-facing line of a trial's error (the innermost cause's last line)."""
    if error is None:
        return ""
    seen = error
    while getattr(seen, "cause", None) is not None and seen.cause is not seen:
        seen = seen.cause
    text = str(seen).strip().splitlines()
    msg = next((line for line in reversed(text) if line.strip()), type(seen).__name__)
    if isinstance(seen, RayMedError) or ":" in msg:
        return msg.strip()
    return f"{type(seen).__name__}: {msg.strip()}"


class _Progress(tune.Callback):
    """One line per finished trial, as it finishes.

    Everything it prints comes from the trial objects Tune hands it (restored with the
    experiment on a resume), so a resumed sweep counts and scores its trials right.
    """

    def __init__(self, params: dict[str, Param], total: int | None, out: str, max_epochs: int, stopper: str) -> None:
        self.params, self.total, self.out = params, total, out
        self.max_epochs, self.stopper = max_epochs, stopper

    def _end(self, trials: list, trial: Any, error: str) -> None:
        done = sum(t.is_finished() for t in trials if t is not trial) + 1
        last = trial.last_result or {}
        epochs = int(last.get("training_iteration") or 0)
        best = (trial.metric_analysis.get(METRIC) or {}).get("max")
        status, reason = end_status(error=error, finished=_finished(Storage.parse(self.out), trial.trial_id),
                                    epochs_run=epochs, max_epochs=self.max_epochs, stopper=self.stopper)
        print(progress_line(trial.trial_id, _decode(trial.config, self.params), status=status, best=best,
                            epochs=epochs, note=error or reason, done=done, total=self.total), flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, "")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            error = _one_line(trial.get_pickled_error() or trial.get_error())
        except Exception:  # noqa: BLE001  (reading the error back must not end the sweep)
            error = ""
        self._end(trials, trial, error or f"the trial failed (see {trial.error_file})")


def _decode(config: dict[str, Any], params: dict[str, Param]) -> dict[str, Any]:
    return {k: p.decode(config[k]) for k, p in params.items() if k in config}


def _finished(out: Storage, trial_id: str) -> bool:
    return out.complete(f"trials/{trial_id}/adapter") and out.complete(f"trials/{trial_id}/metrics.json")


def _search_space(params: dict[str, Param], algorithm: str) -> dict[str, Any]:
    space: dict[str, Any] = {}
    for path, p in params.items():
        if p.kind == "choice":
            values = p.search_values()
            space[path] = tune.grid_search(values) if algorithm == "grid" else tune.choice(values)
        elif p.kind == "uniform":
            space[path] = tune.uniform(p.low, p.high)
        elif p.kind == "loguniform":
            space[path] = tune.loguniform(p.low, p.high)
        else:
            space[path] = tune.randint(int(p.low), int(p.high) + 1)  # Tune's upper bound is exclusive
    return space


def _searcher(cfg: SweepConfig) -> Any:
    s = cfg.search
    if s.algorithm == "tpe":
        # lazy: Optuna is needed by the tpe searcher only
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return OptunaSearch(sampler=optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=s.seed))
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent_trials)


def _max_epochs(base: FinetuneConfig, params: dict[str, Param]) -> int:
    p = params.get("train.epochs")
    if p is None:
        return base.train.epochs
    return int(max(p.representatives()))


def _rows(results: Any, params: dict[str, Param], out: Storage, max_epochs: int, stopper: str) -> list[TrialRow]:
    rows = []
    for result in results:
        trial_id = Path(str(result.path)).name
        df = result.metrics_dataframe
        hist = [float(v) for v in df[METRIC].tolist()] if df is not None and METRIC in df else []
        error = _one_line(result.error) if result.error is not None else ""
        status, reason = end_status(error=error, finished=_finished(out, trial_id), epochs_run=len(hist),
                                    max_epochs=max_epochs, stopper=stopper)
        try:
            attempts = int(out.read_text(f"trials/{trial_id}/{ATTEMPTS_FILE}").strip())
        except (OSError, ValueError, RayMedError):
            attempts = 0
        rows.append(TrialRow(trial_id, _decode(result.config or {}, params), hist, status, reason, error, attempts))
    return sorted(rows, key=lambda r: r.trial_id)


def _copy_folder(src: str, out: Storage, rel: str) -> None:
    local = localize(src)
    with out.local_dir(rel) as folder:
        shutil.copytree(local, folder, dirs_exist_ok=True)


def _export_best(cfg: SweepConfig, plan: TrialPlan, best: TrialRow, meta: dict[str, Any], out: Storage) -> dict:
    """best/: the classifier, its resolved config, a Serve config, its test metrics and the splits."""
    trial_cfg = trial_config(FinetuneConfig, plan.base, plan.params, best.params, decoded=True)
    # What jobs/finetune.py reproduces: the same data, split seed and training (the paths
    # are absolute already), written to that run's own folder.
    trial_cfg = replace(trial_cfg, run=plan.run, output_dir=None, scaling=replace(
        trial_cfg.scaling, cpus_per_worker=trial_cfg.scaling.cpus_per_worker or plan.threads))
    _copy_folder(out.join("trials", best.trial_id, "adapter"), out, "best/adapter")
    out.write_text("best/config.yaml", f"# The best trial ({best.trial_id}) of the sweep in {out.uri}: reproduce it "
                   "with\n#   python jobs/finetune.py --config <this file>\n" + to_yaml(trial_cfg))
    metrics = json.loads(out.read_text(f"trials/{best.trial_id}/metrics.json"))
    out.write_text("best/metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
    out.write_text("best/splits.json", meta["splits_json"])
    template = read_serve_config(resolve_path(cfg.serve_template))
    serve = with_args(template, model="", model_name="", adapters={},
                      classifiers={meta["task"]: out.join("best", "adapter")})
    out.write_text("best/serve.yaml", "# Serves the sweep's best classifier:  serve run <this file>\n"
                   + yaml.safe_dump(serve, sort_keys=False))
    return metrics


def run_sweep(cfg: SweepConfig, ctx: RunContext) -> SweepOutputs:
    """Check the space, prepare the data once, run (or resume) the Tune experiment, export the best trial."""
    data = base_data(FinetuneConfig, cfg.base, base_overrides(cfg))
    base = from_dict(FinetuneConfig, data, where=cfg.base)
    # The data task and the trials run in other processes: the paths they read are made
    # absolute here, against this job's working directory.
    paths = [format_override("data.root", resolve_path(base.data.root))]
    if base.model.path:
        paths.append(format_override("model.path", resolve_path(base.model.path)))
    if base.domain_adapter:
        paths.append(format_override("domain_adapter", resolve_path(base.domain_adapter)))
    data = apply_overrides(FinetuneConfig, data, paths)
    base = from_dict(FinetuneConfig, data, where=cfg.base)
    if base.stage != "downstream":
        raise ConfigError(f"{cfg.base}: a sweep tunes the downstream stage (classifier, dev AUROC); "
                          f"this config is stage={base.stage}")
    params = parse_space(cfg.space)
    check_space(FinetuneConfig, data, params)
    if cfg.search.algorithm == "grid":
        total: int | None = grid_size(params) * cfg.search.samples
    else:
        total = cfg.search.samples
    max_epochs = _max_epochs(base, params)
    if cfg.scheduler.name == "asha" and cfg.scheduler.grace_period > max_epochs:
        raise ConfigError(f"scheduler.grace_period ({cfg.scheduler.grace_period}) is more than the trials' "
                          f"{max_epochs} epochs")
    serve_template = resolve_path(cfg.serve_template)
    read_serve_config(serve_template)  # a bad template fails now, not after the sweep

    resources = init_ray(cfg.run)
    base = replace(base, run=cfg.run)
    workers = max(1, base.scaling.num_workers)
    threads = max(1, int(resources.get("CPU", 1)) // (cfg.search.max_concurrent_trials * workers))
    out_dir = cfg.output_dir or ctx.dir
    out = Storage.parse(out_dir)

    t0 = time.perf_counter()
    meta_ref, prepared = _prepare.remote(base)
    try:
        meta = ray.get(meta_ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, RayMedError):
            raise type(exc.cause)(str(exc.cause)) from None
        raise
    out.write_text("splits.json", meta["splits_json"])
    print(f"[sweep] {meta['task']}: {meta['n']['train']} train / {meta['n']['dev']} dev / {meta['n']['test']} test "
          f"items read, split and tokenized once ({time.perf_counter() - t0:.1f} s); "
          f"{len(params)} swept keys: " + ", ".join(f"{k} ({p.describe()})" for k, p in params.items()), flush=True)

    # Trials run elsewhere (another process, another node): every path they read is absolute.
    data = apply_overrides(FinetuneConfig, data, [
        format_override("model.path", meta["base_path"]), format_override("data.path", meta["data_path"]),
        format_override("domain_adapter", meta["domain_adapter"])])
    plan = TrialPlan(base=data, params=params, run=cfg.run, out=out.uri,
                     train_storage=Storage.parse(ctx.dir).join("train"), base_path=meta["base_path"],
                     task_type=meta["task_type"], ordinal=meta["ordinal"],
                     n_train=meta["n"]["train"], threads=threads, prepared=prepared)
    trainable = tune.with_resources(tune.with_parameters(_trial, plan=plan), TRIAL_DRIVER_RESOURCES)
    stopper = "ASHA" if cfg.scheduler.name == "asha" else "the sweep"
    if cfg.search.time_budget_s:
        stopper += " or the time budget"
    progress = _Progress(params, total, out.uri, max_epochs, stopper)
    # Save Tune's experiment state every second, so a finished trial is on record as soon
    # as it ends (an interrupted sweep then reruns none of them). Saving at every step of
    # Tune's loop (0) costs the driver a fifth of a core; "auto" can wait minutes.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Tune's own progress output (a box, result tables, a TensorBoard hint) is off: the job
    # prints one line per trial. The legacy output engine honours verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    exp_path = Storage.parse(ctx.dir).join("tune")
    if tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        print(f"[sweep] resuming the sweep in {exp_path}: its finished trials are kept, its unfinished ones go on "
              "from their last epoch", flush=True)
    else:
        scheduler: Any = FIFOScheduler()
        if cfg.scheduler.name == "asha":
            scheduler = LastEpochASHA(last_epoch=max_epochs, grace_period=min(cfg.scheduler.grace_period, max_epochs),
                                      reduction_factor=cfg.scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=_search_space(params, cfg.search.algorithm),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", search_alg=_searcher(cfg), scheduler=scheduler,
                num_samples=cfg.search.samples,
                max_concurrent_trials=cfg.search.max_concurrent_trials if cfg.search.algorithm == "tpe" else None,
                time_budget_s=cfg.search.time_budget_s or None,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=tune.RunConfig(name="tune", storage_path=ctx.dir,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[progress], verbose=0),
        )
    # A failed trial is one line here (and its error.txt); Tune would also log its traceback.
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    results = tuner.fit()
    wall = time.perf_counter() - t0

    rows = _rows(results, params, out, max_epochs, stopper)
    names = list(params)
    out.write_text("trials.csv", trials_csv(rows, names))
    best = best_trial(rows)
    with out.local_dir("plots") as folder:
        plot_curves(rows, folder / "epochs.png", stopper=stopper)
        plot_params(rows, names, folder, log_scale=[k for k, p in params.items() if p.kind == "loguniform"])
    trial_epochs = sum(r.epochs for r in rows)
    print(f"\n{len(rows)} trials, {trial_epochs} trial-epochs, {wall:.0f} s "
          f"({', '.join(f'{s} {sum(r.status == s for r in rows)}' for s in ('completed', 'early_stopped', 'stopped', 'failed') if any(r.status == s for r in rows))})")
    print(summary_table(rows, names, best))
    failed = [r for r in rows if r.status == "failed"]
    if rows and len(failed) == len(rows):
        raise RayMedError(f"every trial failed; the first: {failed[0].error}")
    outputs = SweepOutputs(run_dir=ctx.dir, output_dir=out.uri, trials=[row_record(r) for r in rows],
                           trial_epochs=trial_epochs)
    if best is None:
        raise RayMedError("no trial finished with a classifier to export (every one was stopped or failed); "
                          "raise search.time_budget_s or scheduler.grace_period")
    metrics = _export_best(cfg, plan, best, meta, out)
    lo, hi = metrics["auroc_macro_ci"]
    print(f"\nbest trial {best.trial_id}: best dev AUROC {best.best:.4f} at epoch {best.best_epoch}; "
          + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    print(f"  its test macro AUROC {metrics['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}] on {metrics['n']} items "
          "(the test split: never trained or selected on)")
    print(f"best:    {out.join('best')}  (evaluate.py classify --model {out.join('best')} --max-length "
          f"{base.train.max_length}; serve run {out.join('best', 'serve.yaml')})")
    print(f"trials:  {out.join('trials.csv')}  plots: {out.join('plots')}")
    return replace(outputs, best_trial=best.trial_id, best_params=best.params, best_dev_auroc=best.best,
                   test_metrics={k: metrics[k] for k in ("auroc_macro", "auroc_macro_ci", "accuracy", "n")
                                 if k in metrics},
                   best_dir=out.join("best"))
