"""The data report as text: a markdown table of records, tokens, images and sequences per source."""

from __future__ import annotations

from typing import Any

from ray_med.corpus.config import CorpusOutputs


def print_corpus(out: CorpusOutputs) -> None:
    """The data report and where everything went."""
    print(format_report(out.report))
    print(f"\nrun folder:  {out.run_dir}")
    print(f"corpus:      {out.corpus_dir}/<source>.parquet")
    print(f"tokenizer:   {out.tokenizer_dir}  (an HF folder: transformers' AutoTokenizer loads it)")
    print(f"data report: {out.report_path}")


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
