"""Where and how a job runs: Ray connection, run storage, run names, seeds, logging.

A job calls :func:`start_run` once. It sets up logging and seeds, picks the run's name
and storage folder, writes the resolved config there, and :func:`init_ray` connects to
the cluster named by ``RAY_ADDRESS`` (which ``ray job submit`` sets) or starts an
embedded local Ray sized to this machine. Only the config changes between a laptop and
a cluster: ``run.storage`` becomes ``s3://…``/``gs://…`` or a shared NFS path, which Ray
Train also takes as its ``storage_path``.

Run names come from the job name and a hash of the config, never from the clock, so
resubmitting the same job with the same config lands in the same folder and finds its
own checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from ray_med.config import config_hash, to_yaml
from ray_med.errors import ConfigError, RayMedError

log = logging.getLogger("ray_med")

# Schemes pyarrow.fs.FileSystem.from_uri understands (and so Ray Train's storage_path).
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock")


@dataclass
class RuntimeConfig:
    """Settings every job shares: where runs are stored, how Ray is reached, seeds, logs."""

    name: str | None = None
    """Run name; by default '<job>-<hash of the config>', so a resubmitted run resumes."""
    storage: str = "runs"
    """Storage root for runs: a local path or a URI pyarrow takes (s3://bucket/runs, gs://...)."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level for ray_med's loggers."""
    ray_address: str | None = None
    """Ray cluster to connect to; default: $RAY_ADDRESS if set, else an embedded local Ray."""
    num_cpus: int | None = None
    """CPUs for the embedded local Ray (default: all of this machine's); ignored on a cluster."""


# ------------------------------------------------------------------------- logging / seeds


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, not the stream it was created with
    (a process that redirects stderr, like a test capturing it, keeps getting the logs)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    """Send ray_med's logs to stderr with timestamps, once per process."""
    logger = logging.getLogger("ray_med")
    logger.setLevel(level)
    if not any(getattr(h, "_ray_med", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._ray_med = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for a reproducible run."""
    # lazy: this module holds RuntimeConfig, which every job config parses without torch
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class Storage:
    """A storage root: a local folder or a URI, with the few file operations jobs need."""

    uri: str
    """Absolute local path, or a URI with one of :data:`STORAGE_SCHEMES`."""

    @classmethod
    def parse(cls, root: str) -> Storage:
        """Validate a storage root and make local paths absolute (Ray Train requires it)."""
        if not root:
            raise ConfigError("run.storage is empty; give a folder or a URI such as s3://bucket/runs")
        scheme = urlparse(root).scheme
        if "://" in root:
            if scheme not in STORAGE_SCHEMES:
                raise ConfigError(
                    f"run.storage {root!r}: unsupported scheme '{scheme}://'; "
                    f"use a local path or one of: {', '.join(s + '://' for s in STORAGE_SCHEMES)}"
                )
            # file:// stays a URI and goes through pyarrow like s3:// does, which lets
            # the tests exercise the remote code path on a local disk.
            return cls(root.rstrip("/"))
        return cls(str(Path(root).expanduser().resolve()))

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    def join(self, *parts: str) -> str:
        if self.is_local:
            return str(Path(self.uri, *parts))
        return "/".join([self.uri, *[p.strip("/") for p in parts]])

    def filesystem(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it). Created lazily: remote ones may touch the network."""
        import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for URI storage

        if self.is_local:
            return pafs.LocalFileSystem(), self.uri
        return pafs.FileSystem.from_uri(self.uri)

    def write_text(self, relpath: str, text: str) -> str:
        """Write a small text file under the root and return its full path or URI."""
        target = self.join(relpath)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_text(text, encoding="utf-8")
            return target
        fs, base = self.filesystem()
        path = f"{base}/{relpath.strip('/')}"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(text.encode("utf-8"))
        return target

    def read_text(self, relpath: str) -> str:
        """Read a small text file under the root."""
        if self.is_local:
            return Path(self.join(relpath)).read_text(encoding="utf-8")
        fs, base = self.filesystem()
        with fs.open_input_stream(f"{base}/{relpath.strip('/')}") as src:
            return src.read().decode("utf-8")

    def list_dir(self, relpath: str = "") -> list[str]:
        """Names of the entries directly under ``relpath`` (none when it does not exist)."""
        if self.is_local:
            path = Path(self.join(relpath)) if relpath else Path(self.uri)
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for URI storage

        fs, base = self.filesystem()
        path = f"{base}/{relpath.strip('/')}" if relpath else base
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))

    @contextlib.contextmanager
    def local_dir(self, relpath: str) -> Iterator[Path]:
        """A local folder that ends up at ``relpath`` under the root.

        Local roots yield the folder itself. Remote roots yield a temporary folder that
        is uploaded when the block exits without error, so a failed step never leaves a
        half-written artifact behind in the bucket.
        """
        if self.is_local:
            path = Path(self.join(relpath))
            path.mkdir(parents=True, exist_ok=True)
            yield path
            return
        import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for URI storage

        tmp = Path(tempfile.mkdtemp(prefix="ray_med-"))
        try:
            yield tmp
            fs, base = self.filesystem()
            dest = f"{base}/{relpath.strip('/')}"
            fs.create_dir(dest, recursive=True)
            pafs.copy_files(str(tmp), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ the run


def run_name(job: str, cfg: Any, runtime: RuntimeConfig) -> str:
    """``runtime.name`` if set, else ``<job>-<hash>`` of the config without its ``run`` section."""
    if runtime.name:
        return runtime.name
    return f"{job}-{config_hash(cfg, exclude=('run',))}"


@dataclass(frozen=True)
class RunContext:
    """What a running job knows about itself: its name and its folder."""

    job: str
    name: str
    storage: Storage
    """The storage root (``run.storage``)."""

    @property
    def dir(self) -> str:
        """The run's folder or URI: ``<storage>/<name>``."""
        return self.storage.join(self.name)

    def path(self, *parts: str) -> str:
        """A path or URI inside the run's folder."""
        return self.storage.join(self.name, *parts)

    def write_text(self, relpath: str, text: str) -> str:
        return self.storage.write_text(f"{self.name}/{relpath}", text)

    def local_dir(self, relpath: str) -> contextlib.AbstractContextManager[Path]:
        return self.storage.local_dir(f"{self.name}/{relpath}")


def start_run(job: str, cfg: Any, runtime: RuntimeConfig) -> RunContext:
    """Set up logging and seeds, name the run, and record its resolved config."""
    setup_logging(runtime.log_level)
    seed_everything(runtime.seed)
    ctx = RunContext(job=job, name=run_name(job, cfg, runtime), storage=Storage.parse(runtime.storage))
    ctx.write_text("config.yaml", to_yaml(cfg))
    log.info("run %s -> %s", ctx.name, ctx.dir)
    return ctx


# ---------------------------------------------------------------------------------- Ray


def free_port() -> int:
    """A TCP port free on this machine right now (for a local head, a Serve proxy, a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Quieter third-party output, through the settings those libraries offer: weight-loading
# progress bars off, and Ray Data's console at WARNING (its INFO stays in ray-data.log).
# Set (unless the user set them) before a job imports Ray Data; Ray's processes on this
# machine inherit them.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
}


def quiet_logs() -> None:
    """Apply :data:`QUIET_ENV` to this process (a user's own settings win)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


_embedded = False


def embedded_ray() -> bool:
    """Whether this process started the Ray it uses (an embedded local Ray that ends with it)."""
    import ray  # lazy: as in init_ray

    return _embedded and ray.is_initialized()


def init_ray(runtime: RuntimeConfig) -> dict[str, Any]:
    """Connect to a Ray cluster, or start an embedded local one; return its resources.

    ``runtime.ray_address`` wins, then ``$RAY_ADDRESS`` (set by ``ray job submit``).
    Without either, a local Ray starts with ``address="local"``: a bare ``ray.init()``
    would silently attach to any cluster a ``ray start`` left running on this machine.
    """
    # lazy: every job config imports this module; Ray loads when a job connects
    import ray
    import ray.data

    global _embedded
    if ray.is_initialized():
        return ray.cluster_resources()
    # Ray's own logs stay at WARNING unless asked: the job's progress is what matters here.
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        num_cpus = runtime.num_cpus or os.cpu_count() or 1
        log.info("starting an embedded local Ray with %d CPUs", num_cpus)
        # Nothing on one machine is preempted: Ray Train's preemption watcher (on by
        # default, right for clusters of spot nodes) would only log about itself.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner
        # polls; without it the cleaner logs a warning every few seconds. Local only.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING)
        _embedded = True
    # Ray Data's tasks and actors (the split coordinator of a Train shard) log their
    # progress (INFO, kept in ray-data.log) instead of drawing tqdm bars into job logs.
    ray.data.DataContext.get_current().use_ray_tqdm = False
    return ray.cluster_resources()


def ray_get(refs: Any, *, timeout: float | None = None) -> Any:
    """``ray.get`` that re-raises a user error from a remote task as itself.

    A :class:`~ray_med.errors.RayMedError` raised inside a task (a malformed record, a
    missing file on the worker) reaches the driver wrapped in ``RayTaskError`` with the
    remote traceback; the job should print the one-line message instead.
    """
    import ray  # lazy: as in init_ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, RayMedError):
            raise exc.cause from None
        raise
