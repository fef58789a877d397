"""The corpus job's config and outputs (plain dataclasses: ``--help`` needs neither Ray nor torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_med.data.config import CorpusConfig
from ray_med.models.config import TokenizerConfig
from ray_med.runtime import RuntimeConfig


@dataclass
class CorpusJobConfig:
    """Read the sources, train the tokenizer, count records, tokens, images and sequences per source."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Run name, storage, seed, logging and Ray connection."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The sources to read."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer training settings (tokenizer.path is not used here)."""
    seq_len: int = 256
    """Sequence length that packed-sequence counts are reported for."""
    heldout_fraction: float = 0.05
    """Documents held out of tokenizer training, by the same rule and seed as pretraining's held-out split
    (set it to pretraining's eval.heldout_fraction), so held-out text never shapes the vocabulary."""


@dataclass
class CorpusOutputs:
    """What the corpus job produced."""

    run_dir: str
    corpus_dir: str
    """<run>/corpus/<source>.parquet, one file per source."""
    tokenizer_dir: str
    """An HF tokenizer folder (AutoTokenizer loads it)."""
    report_path: str
    report: dict[str, Any] = field(default_factory=dict)
    """Records, tokens, images and sequences per source, and the totals."""

    def headline(self) -> tuple[str, Any]:
        return "tokens", self.report.get("total", {}).get("tokens")
