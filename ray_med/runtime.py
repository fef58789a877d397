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
import hashlib
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from ray_med.config import config_hash, to_dict, to_yaml
from ray_med.errors import ConfigError, ModelError, RayMedError

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

# A folder written to a URI root is committed by this file, written last with a fresh
# token: readers (localize, the pipeline's cache, resumed runs) take a remote folder only
# when it is there. Object stores cannot rename a folder, so the marker is the commit.
MARKER = "_SUCCESS"
# Where localize() keeps its copies of remote folders (one per URI and commit).
CACHE_ENV = "RAY_MED_CACHE"


def is_uri(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names remote (pyarrow) storage, ``s3://...`` or ``file://...``, rather than a local path."""
    text = str(path)
    return "://" in text and not text.startswith("pkg://")


@dataclass(frozen=True)
class Storage:
    """A storage root: a local folder or a URI, with the few file operations jobs need.

    Every output is written atomically. A local file or folder is written under a
    temporary name beside it (``<name>.tmp-<uuid>``) and renamed into place on success;
    a remote folder is uploaded only on success and committed by :data:`MARKER`. A
    failed save leaves the previous complete version, or nothing, never half a folder.
    """

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
        parts = tuple(p for p in parts if p)
        if self.is_local:
            return str(Path(self.uri, *parts))
        return "/".join([self.uri, *[p.strip("/") for p in parts]])

    def filesystem(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it). Created lazily: remote ones may touch the network."""
        import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for URI storage

        if self.is_local:
            return pafs.LocalFileSystem(), self.uri
        return pafs.FileSystem.from_uri(self.uri)

    def _remote(self, relpath: str) -> tuple[Any, str]:
        fs, base = self.filesystem()
        return fs, f"{base}/{relpath.strip('/')}" if relpath.strip("/") else base

    @contextlib.contextmanager
    def open_output(self, relpath: str) -> Iterator[Any]:
        """A binary stream to ``relpath`` under the root, published only when the block exits without error."""
        fs, path = self._remote(relpath)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        # Written aside and moved on success, on every file system: pyarrow's stream has no
        # abort, so an error inside the block still completes an S3 upload when the stream
        # closes, and that object must not be the published name (a local move is a rename,
        # S3's a server-side copy and delete).
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(tmp) as out:
                yield out
            fs.move(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.delete_file(tmp)

    def write_text(self, relpath: str, text: str) -> str:
        """Write a small text file under the root, atomically (:meth:`open_output`), and return its full path or URI."""
        with self.open_output(relpath) as out:
            out.write(text.encode("utf-8"))
        return self.join(relpath)

    def read_text(self, relpath: str) -> str:
        """Read a small text file under the root."""
        if self.is_local:
            return Path(self.join(relpath)).read_text(encoding="utf-8")
        fs, path = self._remote(relpath)
        with fs.open_input_stream(path) as src:
            return src.read().decode("utf-8")

    def list_dir(self, relpath: str = "") -> list[str]:
        """Names of the entries directly under ``relpath`` (none when it does not exist)."""
        if self.is_local:
            path = Path(self.join(relpath)) if relpath else Path(self.uri)
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for URI storage

        fs, path = self._remote(relpath)
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))

    def complete(self, relpath: str = "") -> bool:
        """Whether ``relpath`` holds a finished output: a file, or a folder that was committed.

        A local folder exists only once renamed into place; a remote one needs its marker.
        """
        if self.is_local:
            return Path(self.join(relpath)).exists()
        return self._version(relpath) is not None

    def _version(self, relpath: str) -> str | None:
        """A token that changes whenever the remote output at ``relpath`` is rewritten; None if incomplete."""
        import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for URI storage

        fs, path = self._remote(relpath)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return f"file:{info.size}:{info.mtime_ns}"
        if info.type != pafs.FileType.Directory:
            return None
        marker = fs.get_file_info(f"{path}/{MARKER}")
        if marker.type != pafs.FileType.File:
            return None
        with fs.open_input_stream(marker.path) as src:
            return f"dir:{src.read().decode('utf-8', 'replace').strip()}:{marker.mtime_ns}"

    @contextlib.contextmanager
    def local_dir(self, relpath: str) -> Iterator[Path]:
        """A local folder, empty, that replaces ``relpath`` under the root when the block exits without error.

        Local roots: a sibling ``<name>.tmp-<uuid>`` renamed into place (the old folder,
        if any, is moved aside first and deleted after). Remote roots: a temporary folder
        uploaded to a sibling ``<name>.tmp-<uuid>`` while the old version stays committed;
        then the old one is un-committed (its :data:`MARKER` removed first) and deleted,
        the sibling copied into place within the store, and :data:`MARKER` written last. A failed step leaves the previous version, or
        nothing, and is redone by whoever checks :meth:`complete`.
        """
        token = uuid.uuid4().hex
        if self.is_local:
            target = Path(self.join(relpath))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp-{token[:8]}")
            tmp.mkdir()
            try:
                yield tmp
                old = target.with_name(f"{target.name}.old-{token[:8]}")
                if target.exists() or target.is_symlink():
                    os.rename(target, old)
                os.rename(tmp, target)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                elif old.exists() or old.is_symlink():
                    old.unlink()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for URI storage

        tmp = Path(tempfile.mkdtemp(prefix="ray_med-"))
        fs, dest = self._remote(relpath)
        staged = f"{dest}.tmp-{token[:8]}"
        try:
            yield tmp
            # The upload (the slow part, the one a network error or a kill interrupts) goes
            # to a sibling first: the previous version stays committed until it is done.
            fs.create_dir(staged, recursive=True)
            pafs.copy_files(str(tmp), staged, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            info = fs.get_file_info(dest)
            if info.type == pafs.FileType.Directory:
                if fs.get_file_info(f"{dest}/{MARKER}").type == pafs.FileType.File:
                    fs.delete_file(f"{dest}/{MARKER}")  # un-commit first: readers stop trusting it now
                fs.delete_dir(dest)
            elif info.type == pafs.FileType.File:
                fs.delete_file(dest)
            # Within one file system: a server-side copy on an object store, no new upload.
            fs.create_dir(dest, recursive=True)
            pafs.copy_files(staged, dest, source_filesystem=fs, destination_filesystem=fs)
            with fs.open_output_stream(f"{dest}/{MARKER}") as out:
                out.write(f"{token}\n".encode())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                if fs.get_file_info(staged).type != pafs.FileType.NotFound:
                    fs.delete_dir(staged)


def cache_root() -> Path:
    """Where :func:`localize` keeps local copies of remote outputs: ``$RAY_MED_CACHE`` or ``~/.cache/ray_med``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/ray_med").expanduser()


def is_complete(path: str) -> bool:
    """Whether a path or URI names a finished output (see :meth:`Storage.complete`)."""
    return Storage.parse(path).complete()


def localize(path: str, *, what: str = "folder", error: type[RayMedError] = ModelError) -> str:
    """A local path for a file or folder named by a local path (returned as it is) or a URI.

    A remote output is downloaded once into :func:`cache_root` under a hash of its URI
    and its commit token, then reused by every later call on this machine (transformers,
    PEFT and safetensors need local files). A remote folder must be committed (its
    :data:`MARKER` present), so a half-uploaded model is refused rather than loaded; a
    rewritten one gets a new cache entry. Delete the cache folder to reclaim space.
    """
    if not is_uri(path):
        return path
    import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for URI storage

    source = Storage.parse(path)
    name = source.uri.rsplit("/", 1)[-1] or "root"
    for _ in range(3):
        version = source._version("")
        if version is None:
            fs, base = source.filesystem()
            if fs.get_file_info(base).type == pafs.FileType.NotFound:
                raise error(f"{what} not found: {source.uri}")
            raise error(
                f"{what} {source.uri} is incomplete: it has no {MARKER} marker (a save that failed or is still "
                f"running). Rerun the job that writes it; a folder uploaded by other means needs an empty "
                f"{MARKER} file in it once complete."
            )
        key = hashlib.sha256(f"{source.uri}\n{version}".encode()).hexdigest()[:16]
        final = cache_root() / key
        if (final / name).exists():
            return str(final / name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{key}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            fs, base = source.filesystem()
            # copy_files makes the subfolders it copies, not the destination itself
            (tmp / name if version.startswith("dir:") else tmp).mkdir(parents=True)
            pafs.copy_files(base, str(tmp / name), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            if source._version("") != version:
                continue  # rewritten while we copied: take the new version
            log.info("downloaded %s to %s", source.uri, final / name)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / name).exists():  # another process on this machine won the race otherwise
                    raise
            return str(final / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise error(f"{what} {source.uri} kept changing while it was downloaded; retry when its writer is done")


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

    def complete(self, relpath: str) -> bool:
        """Whether the run's ``relpath`` is a finished output (see :meth:`Storage.complete`)."""
        return self.storage.complete(f"{self.name}/{relpath}")


# Ray sets this for the entrypoint of `ray job submit` (the job's runtime_env and metadata).
SUBMITTED_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Config keys (or key suffixes) naming where a job writes, and where it reads its data from.
OUTPUT_KEYS = ("run.storage", "output_dir")
DATA_KEYS = ("corpus.root", "data.root", "data_root")


def submitted_job() -> bool:
    """Whether this process is a job started by ``ray job submit`` (its working directory is Ray's copy)."""
    return SUBMITTED_ENV in os.environ


def check_submitted_paths(cfg: Any) -> None:
    """Under ``ray job submit``, refuse relative output and data paths, before any work.

    A submitted job runs in Ray's temporary copy of ``--working-dir`` (under the node's
    ``runtime_resources/working_dir_files``): a relative ``run.storage`` would write the
    results there, deleted with it, and a relative data root names a folder inside it,
    which holds only what was uploaded.
    """
    if not submitted_job():
        return
    cwd = os.getcwd()

    def check(key: str, value: Any) -> None:
        if not isinstance(value, str) or not value or is_uri(value) or value.startswith(("/", "~", "pkg://")):
            return
        where = os.path.normpath(os.path.join(cwd, value))
        if any(key == k or key.endswith("." + k) for k in OUTPUT_KEYS):
            raise ConfigError(
                f"{key}={value!r} is relative, and this job runs under `ray job submit` in Ray's temporary copy "
                f"of the working directory ({cwd}): its outputs would be written to {where} and deleted with it. "
                f"Give shared storage every node reaches: {key}=s3://bucket/runs or an absolute path "
                f"({key}=/mnt/shared/runs)."
            )
        if any(key == k or key.endswith("." + k) for k in DATA_KEYS) and not os.path.exists(where):
            raise ConfigError(
                f"{key}={value!r} is relative, and this job runs under `ray job submit` in Ray's temporary copy "
                f"of the working directory ({cwd}), where it names {where}, which does not exist. "
                f"Give the data's absolute path on the cluster ({key}=/mnt/data)."
            )

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            path = node.get("path")
            for k, v in node.items():
                if k == "root" and isinstance(path, str) and (is_uri(path) or path.startswith(("/", "~", "pkg://"))):
                    continue  # a data root is used only to resolve a relative data.path
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            check(key, node)

    walk(to_dict(cfg), "")


def start_run(job: str, cfg: Any, runtime: RuntimeConfig) -> RunContext:
    """Set up logging and seeds, name the run, and record its resolved config."""
    check_submitted_paths(cfg)
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
