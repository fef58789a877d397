"""What each pipeline stage prints: the tables a user reads, from the stage's typed outputs.

The same functions print a stage that ran and a stage reused from an earlier run, so a
cached rerun shows the same tables.
"""

from __future__ import annotations

from typing import Any

from ray_med.corpus.config import CorpusOutputs
from ray_med.corpus.report import print_corpus
from ray_med.federated.config import FederatedOutputs
from ray_med.injection.config import InjectOutputs
from ray_med.serving.client import print_serve_check
from ray_med.serving.config import ServeCheckOutputs
from ray_med.training.config import FinetuneOutputs, PretrainOutputs
from ray_med.training.multimodal_config import MultimodalOutputs
from ray_med.tuning.config import SweepOutputs
from ray_med.tuning.report import best_trial, rows_from_outputs, summary_table


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


def format_classifier(m: dict[str, Any]) -> str:
    """The downstream stage's metrics (on its test split) as a markdown table."""
    split = m.get("split", "dev")  # runs from before the train/dev/test split reported dev metrics
    lines = [f"\n{m['task']} {split} metrics ({m['n']} examples, {m['trainable']:,} trainable parameters):", "",
             "| metric | value | 95% CI |", "|---|---|---|"]
    for key in ("auroc_macro", "auprc_macro", "f1_macro", "accuracy"):
        lo, hi = m[f"{key}_ci"]
        lines.append(f"| {key} | {m[key]:.4f} | [{lo:.4f}, {hi:.4f}] |")
    return "\n".join(lines)


def show_data(out: CorpusOutputs, cached: bool) -> None:
    if cached:
        print_corpus(out)


def show_pretrain(out: PretrainOutputs, cached: bool) -> None:
    if cached:
        print(f"model:       {out.model_dir}")
    print(format_perplexity(out.history))


def show_domain(out: FinetuneOutputs, cached: bool) -> None:
    if cached:
        print(f"domain adapter: {out.adapter_dir}")
    print(format_perplexity(out.history))


def show_multimodal(out: MultimodalOutputs, cached: bool) -> None:
    if cached:
        print(f"model:       {out.model_dir}")
    m = out.metrics
    lines = [f"\nheld-out metrics ({m.get('phase')} phase, {m.get('steps')} steps, {m.get('train_s', 0):.0f}s of "
             f"training; best {m.get('monitor')} {m.get('best_dev') if m.get('best_dev') is None else round(m['best_dev'], 4)}):", "",
             "| task | n | macro AUROC | 95% CI | macro F1 | accuracy |", "|---|---|---|---|---|---|"]
    for task, e in (m.get("eval") or {}).items():
        if "auroc_macro" in e:
            lo, hi = e["auroc_macro_ci"]
            lines.append(f"| {task} | {e['n']} | {e['auroc_macro']:.4f} | [{lo:.4f}, {hi:.4f}] | {e['f1_macro']:.4f} "
                         f"| {e['accuracy']:.4f} |")
    print("\n".join(lines))


def show_federated(out: FederatedOutputs, cached: bool) -> None:
    lines = ["", "| round | clients | dropped | dev AUROC | round s | client compute s |", "|---|---|---|---|---|---|"]
    for r in out.rounds:
        dev = ", ".join(f"{m} {v['auroc_macro']:.3f}" for m, v in (r.get("dev") or {}).items()) or "-"
        lines.append(f"| {r['round']} | {len(r['participants'])}/{r['sampled']} | {len(r.get('dropped') or {})} | {dev} "
                     f"| {r.get('round_s', 0):.1f} | {r.get('client_compute_s', 0):.1f} |")
    for mod, m in out.test.items():
        lo, hi = m["auroc_macro_ci"]
        lines.append(f"\n{mod} test: macro AUROC {m['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}] on {m['n']}")
    lines.append(f"global model: {out.global_dir}/<modality>")
    print("\n".join(lines))


def show_inject(out: InjectOutputs, cached: bool) -> None:
    """The job prints its results as it runs; a cached stage prints them again from its outputs."""
    if not cached:
        return
    m = out.metrics
    compare = m.get("compare") or {m["method"]: {t: v["auroc_macro"] for t, v in m["test"].items()}}
    methods = list(compare)
    lines = ["", "| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for task, v in m["test"].items():
        kind = "seen" if v["seen"] else "unseen"
        lines.append(f"| {task} ({kind}) | " + " | ".join(_auroc(compare[k].get(task)) for k in methods) + " |")
    for task, g in (m.get("gate") or {}).items():
        lines.append(f"gate {task}: entropy {g['entropy']:.3f}, expert usage [{' '.join(f'{u:.2f}' for u in g['usage'])}]")
    lines.append(f"model:   {out.model_dir}")
    print("\n".join(lines))


def show_sweep(out: SweepOutputs, cached: bool) -> None:
    """The job prints its trials as they end; a cached stage prints the table and the best trial again."""
    if not cached:
        return
    rows = rows_from_outputs(out.trials)
    names = list(out.best_params) or sorted({k for r in rows for k in r.params})
    print(summary_table(rows, names, best_trial(rows)))
    t = out.test_metrics
    if t:
        lo, hi = t["auroc_macro_ci"]
        print(f"best trial {out.best_trial}: best dev AUROC {_auroc(out.best_dev_auroc)}; its test macro AUROC "
              f"{t['auroc_macro']:.4f} [{lo:.4f}, {hi:.4f}] on {t['n']} items")
    print(f"best:    {out.best_dir}")


def _auroc(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


def show_downstream(out: FinetuneOutputs, cached: bool) -> None:
    if cached:
        print(f"classifier:  {out.adapter_dir}")
    print(format_classifier(out.metrics))


def show_serve(out: ServeCheckOutputs, cached: bool) -> None:
    if cached:
        # lazy: the serve_check module imports Ray Serve; the pipeline prints without it otherwise
        from ray_med.serving.deploy import print_multimodal_check

        (print_multimodal_check if out.multimodal else print_serve_check)(out, cached=True)
