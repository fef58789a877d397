"""Driver memory of pretraining's data preparation: the real corpus at 1x and at 8x.

Runs ``ray_med.training.pretrain.prepare_data`` for the tiny pretraining config
(``jobs/configs/pretrain/tiny.yaml``) on the real corpus in ``../shared/data`` (1x), and
on the same source files copied 8 times into a temporary folder as 8 sources each (8x:
``abstracts_0`` ... ``replay_7``). Each run is a fresh Python process that starts its own
embedded Ray, runs only the data preparation and reports its peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``, which covers the imports and Ray's start too),
its RSS just before ``prepare_data`` and the sequences it prepared (so the 8x run is
seen to handle 8x the data). Runs alternate 1x, 8x, ``--repeats`` times; the median, min
and max of each are written to bench/results/driver_memory.json (or --out) and the
last line printed is a JSON object with ``driver_peak_rss_1x_mb``,
``driver_peak_rss_8x_mb`` and ``rss_ratio_8x``.

    python bench/driver_memory.py [--repeats 3] [--scale 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs/configs/pretrain/tiny.yaml"
SHARED = Path(os.environ.get("RAY_MED_SHARED_DATA", REPO.parent / "shared" / "data"))


def _rss_mb() -> float:
    """Current RSS of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _replicated_sources(root: Path, scale: int) -> list[str]:
    """The tiny config's sources, each copied ``scale`` times under ``root``: overrides naming them."""
    from ray_med.config import load_config
    from ray_med.training.config import PretrainConfig

    cfg = load_config(PretrainConfig, CONFIG, [f"corpus.root={SHARED}"])
    sources = []
    for source in cfg.corpus.sources:
        src = Path(cfg.corpus.resolve(source))
        for i in range(scale):
            dst = root / f"{source.name}_{i}" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copyfile(src, dst)
            sources.append({"name": f"{source.name}_{i}", "reader": source.reader, "path": str(dst),
                            "on_error": source.on_error, "options": source.options})
    return [f"corpus.sources={json.dumps(sources)}"]


def child(scale: int, storage: str) -> None:
    """One measurement: data preparation only, in this fresh process."""
    from ray_med.config import load_config
    from ray_med.runtime import init_ray, start_run
    from ray_med.training.config import PretrainConfig
    from ray_med.training.pretrain import prepare_data

    overrides = [f"corpus.root={SHARED}", f"run.storage={storage}", f"run.name=mem-{scale}x"]
    if scale > 1:
        overrides += _replicated_sources(Path(storage) / "data", scale)
    cfg = load_config(PretrainConfig, CONFIG, overrides)
    ctx = start_run("pretrain", cfg, cfg.run)
    init_ray(cfg.run)
    before = _rss_mb()
    start = time.perf_counter()
    train, eval_blocks, tokenizer, stats = prepare_data(cfg, ctx)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "scale": scale,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "rss_before_prepare_mb": before,
        "seconds": seconds,
        "sources": len(stats),
        "train_sequences": sum(s["train_sequences"] for s in stats.values()),
        "heldout_documents": sum(s["heldout_documents"] for s in stats.values()),
        "train_rows": train.count(),
        "returned_types": sorted({type(train).__name__, type(tokenizer).__name__}
                                 | {type(b).__name__ for b in eval_blocks.values()}),
    }))


def _run_child(scale: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"ray_med-mem-{scale}x-") as tmp:
        proc = subprocess.run([sys.executable, __file__, "--child", str(scale), "--storage", tmp],
                              capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"the {scale}x run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench/results/driver_memory.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.storage)
        return
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found (set RAY_MED_SHARED_DATA)")
    runs: dict[int, list[dict]] = {1: [], args.scale: []}
    for _ in range(args.repeats):
        for scale in runs:
            runs[scale].append(_run_child(scale))
            print(json.dumps(runs[scale][-1]), file=sys.stderr)
    peak = {s: [r["peak_rss_mb"] for r in rs] for s, rs in runs.items()}
    ratios = [b / a for a, b in zip(peak[1], peak[args.scale], strict=True)]
    result = {
        "what": "peak RSS of a fresh driver process running only prepare_data of jobs/configs/pretrain/tiny.yaml",
        "scale": args.scale,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "peak_rss_mb": {f"{s}x": _summary(v) for s, v in peak.items()},
        "rss_before_prepare_mb": {f"{s}x": _summary([r["rss_before_prepare_mb"] for r in rs]) for s, rs in runs.items()},
        "seconds": {f"{s}x": _summary([r["seconds"] for r in rs]) for s, rs in runs.items()},
        "train_sequences": {f"{s}x": rs[0]["train_sequences"] for s, rs in runs.items()},
        "ratio_per_repeat": _summary(ratios),
        "runs": {f"{s}x": rs for s, rs in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    p1, p8 = statistics.median(peak[1]), statistics.median(peak[args.scale])
    print(json.dumps({"driver_peak_rss_1x_mb": round(p1, 1), f"driver_peak_rss_{args.scale}x_mb": round(p8, 1),
                      f"rss_ratio_{args.scale}x": round(p8 / p1, 3)}))


if __name__ == "__main__":
    main()
