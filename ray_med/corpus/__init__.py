"""The corpus job: sources read as Ray tasks into Parquet, the tokenizer trained on them, the data report.

:mod:`~ray_med.corpus.config` holds the job's config and outputs (plain dataclasses);
:mod:`~ray_med.corpus.build` is the Ray edge that reads, writes, trains and counts.
"""
