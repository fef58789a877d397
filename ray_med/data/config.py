"""Config dataclasses for data sources and corpora (plain data, no reading here)."""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray_med.errors import ConfigError, DataError


@dataclass
class SourceConfig:
    """One data source of a corpus: a file in a known format, with its mixing weight."""

    name: str
    """Name used in reports, metrics and record ids (e.g. 'abstracts', 'clinical')."""
    reader: str
    """Reader format: pubmedqa, mtsamples, medqa, medmcqa, mimic_notes, text, jsonl, parquet, medmnist."""
    path: str
    """File path; a relative path is taken from the corpus root."""
    weight: float | None = None
    """Sampling weight in a mixture; null = natural size (as many tokens as the source has)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed records: 'raise' stops with the file and record named; 'skip' counts and skips."""
    options: dict[str, Any] = field(default_factory=dict)
    """Reader-specific options (e.g. text_field for jsonl, splits for medmnist)."""

    def __post_init__(self) -> None:
        if self.weight is not None and self.weight < 0:
            raise ConfigError(f"source '{self.name}': weight must be >= 0 or null, got {self.weight}")


@dataclass
class CorpusConfig:
    """The sources a job reads, and where relative paths start."""

    root: str = "../shared/data"
    """Folder that relative source paths are resolved against (from the working directory)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """The sources, in order."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"corpus.sources: duplicate source names {dupes}; names must be unique")

    def check(self) -> None:
        """Fail fast, before any cluster work, on an unknown reader or a missing file."""
        # lazy: the readers load numpy and pyarrow; a job config parses without them
        from ray_med.data.readers import READERS

        if not self.sources:
            raise ConfigError("corpus.sources is empty: name at least one source")
        for i, source in enumerate(self.sources):
            if source.reader not in READERS:
                close = difflib.get_close_matches(source.reader, list(READERS), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"corpus.sources.{i} ('{source.name}'): unknown reader '{source.reader}'.{hint} "
                    f"Valid readers: {', '.join(READERS)}"
                )
            path = Path(self.resolve(source))
            if not path.exists():
                raise DataError(
                    f"corpus.sources.{i} ('{source.name}'): file not found: {path} "
                    f"(path {source.path!r} under corpus.root {self.root!r})"
                )

    def resolve(self, source: SourceConfig) -> str:
        """The absolute path of a source's file (Ray workers may run in another folder)."""
        if source.path.startswith("pkg://"):
            return str(_package_path(source.path))
        path = Path(source.path).expanduser()
        if not path.is_absolute():
            path = Path(self.root).expanduser() / path
        return str(path.resolve())


def resolve_path(path: str) -> str:
    """An absolute path for a config path: ``pkg://package/sub/path``, ``~`` or relative to the working directory.

    A storage URI (``s3://bucket/runs/x/model``, ``file:///...``) is returned as it is: it
    is already absolute, and the job that reads it downloads it
    (``ray_med.runtime.localize``); made a local path it would become ``<cwd>/s3:/bucket/...``.
    """
    if path.startswith("pkg://"):
        return str(_package_path(path))
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _package_path(uri: str) -> Path:
    """``pkg://package/sub/path``: a path inside an installed Python package.

    Lets a config name data that ships inside a package (and so exists offline, on
    every machine the job's environment is installed on) without a machine-specific path.
    """
    package, _, rest = uri[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{uri}: no installed package '{package}'")
    return Path(next(iter(spec.submodule_search_locations))) / rest
