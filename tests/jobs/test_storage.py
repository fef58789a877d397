"""Runs in remote storage: atomic outputs, the download cache, and the pipeline against a real S3 server.

The S3 server is moto's standalone server on a free local port; pyarrow (and so Ray
Train, our Storage and every job) finds it through ``AWS_ENDPOINT_URL``. The storage
tests run against a local folder, ``file://`` and S3 alike. The tiny pipeline runs on S3
and on ``file://`` in a subprocess, as a user runs it: an embedded Ray of its own, whose workers and Serve
replicas inherit the S3 settings (the shared test Ray started before they were set).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_med.errors import ConfigError, ModelError
from ray_med.runtime import (
    MARKER,
    RuntimeConfig,
    Storage,
    check_submitted_paths,
    free_port,
    is_complete,
    localize,
    start_run,
)

REPO = Path(__file__).resolve().parents[2]
BUCKET = "ray-med-test"


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server with one bucket; yields the environment that points clients at it."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A storage root of each kind, and a private download cache."""
    monkeypatch.setenv("RAY_MED_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file":
        return f"file://{tmp_path}/store"
    for key, value in request.getfixturevalue("s3_server").items():
        monkeypatch.setenv(key, value)
    return f"s3://{BUCKET}/{tmp_path.name}"


def _files(folder: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_folder_is_replaced_only_by_a_complete_one(root: str) -> None:
    storage = Storage.parse(root)
    with storage.local_dir("run/model") as d:
        (d / "weights.bin").write_bytes(b"v1")
        (d / "sub").mkdir()
        (d / "sub" / "config.json").write_text("{}")
        assert not storage.complete("run/model")  # nothing is visible before the block ends
    assert storage.complete("run/model") and is_complete(storage.join("run/model"))
    first = localize(storage.join("run/model"))  # a remote folder: a copy in the cache, with its marker
    assert {k: v for k, v in _files(first).items() if k != MARKER} == {"weights.bin": b"v1", "sub/config.json": b"{}"}

    # A save that fails halfway leaves the previous version as it was, and no stray folders.
    with pytest.raises(RuntimeError), storage.local_dir("run/model") as d:
        (d / "weights.bin").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert storage.complete("run/model")
    assert localize(storage.join("run/model")) == first and Path(first, "weights.bin").read_bytes() == b"v1"
    assert storage.list_dir("run") == ["model"]

    if not storage.is_local:
        # The upload itself fails after sending the new files (a dropped connection, a kill):
        # the old version is still the committed one, and nothing of the new one is left.
        import pyarrow.fs as pafs

        real = pafs.copy_files

        def upload_then_fail(*args, **kwargs):
            real(*args, **kwargs)
            raise OSError("connection reset")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pafs, "copy_files", upload_then_fail)
            with pytest.raises(OSError, match="connection reset"), storage.local_dir("run/model") as d:
                (d / "weights.bin").write_bytes(b"lost")
        assert storage.complete("run/model") and storage.list_dir("run") == ["model"]
        assert localize(storage.join("run/model")) == first

    # A complete rewrite replaces it whole (no file of the old version stays) and is downloaded anew.
    with storage.local_dir("run/model") as d:
        (d / "weights.bin").write_bytes(b"v2")
    second = localize(storage.join("run/model"))
    assert Path(second, "weights.bin").read_bytes() == b"v2" and not Path(second, "sub").exists()
    assert storage.list_dir("run") == ["model"]

    # A first save that fails leaves nothing a reader would take.
    with pytest.raises(RuntimeError), storage.local_dir("run/tokenizer") as d:
        (d / "tokenizer.json").write_text("{")
        raise RuntimeError("killed")
    assert not storage.complete("run/tokenizer")
    if not storage.is_local:
        with pytest.raises(ModelError, match="not found"):
            localize(storage.join("run/tokenizer"))


def test_files_are_written_whole(root: str) -> None:
    storage = Storage.parse(root)
    target = storage.write_text("run/metrics.json", json.dumps({"auroc": 0.5}))
    storage.write_text("run/metrics.json", json.dumps({"auroc": 0.75}))
    assert json.loads(storage.read_text("run/metrics.json")) == {"auroc": 0.75}
    assert storage.list_dir("run") == ["metrics.json"]  # no temporary file left beside it
    assert is_complete(target) and not is_complete(storage.join("run/other.json"))


def test_a_remote_folder_without_its_marker_is_refused(root: str) -> None:
    storage = Storage.parse(root)
    if storage.is_local:
        pytest.skip("a local folder is committed by its rename; local paths are returned as they are")
    with storage.local_dir("run/model") as d:
        (d / "config.json").write_text("{}")
    fs, base = storage.filesystem()
    fs.delete_file(f"{base}/run/model/{MARKER}")  # as if the upload had stopped before its commit
    assert not storage.complete("run/model")
    with pytest.raises(ModelError, match=f"incomplete: it has no {MARKER}"):
        localize(storage.join("run/model"))


def test_pretraining_redoes_a_tokenizer_whose_save_failed(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed pretraining run reuses its tokenizer only when it was saved whole."""
    import ray_med.training.pretrain as pretrain
    from ray_med.models import train_bpe_tokenizer
    from ray_med.training.config import PretrainConfig

    cfg = PretrainConfig(run=RuntimeConfig(storage=root))
    ctx = start_run("pretrain", cfg, cfg.run)
    tok = train_bpe_tokenizer(["Pneumonia: amoxicillin 5 mg/kg, fever 38.5 C."] * 20, vocab_size=300)

    class DiesWhileSaving:
        def save_pretrained(self, folder: str) -> None:
            tok.save_pretrained(folder)
            Path(folder, "tokenizer.json").write_text("{")  # one file half-written, then the job dies
            raise KeyboardInterrupt

    trained: list[int] = []

    def train(docs, **kw):  # stands in for the Ray task that trains it
        trained.append(1)
        return (DiesWhileSaving() if len(trained) == 1 else tok), None

    monkeypatch.setattr(pretrain, "train_tokenizer", train)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run_tokenizer(cfg, ctx, None)
    assert not ctx.complete("tokenizer")
    assert pretrain.run_tokenizer(cfg, ctx, None) is tok and len(trained) == 2  # the resumed run trains it again
    again = pretrain.run_tokenizer(cfg, ctx, None)  # and the next one reuses the complete one
    assert len(trained) == 2 and again.get_vocab() == tok.get_vocab()


def test_a_relative_path_under_ray_job_submit_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ray_med.pipeline.config import PipelineConfig

    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig()
    cfg.run.storage = "runs"
    check_submitted_paths(cfg)  # not submitted: a relative path is the user's working directory
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match=r"run.storage='runs' is relative.*ray job submit.*s3://"):
        start_run("pipeline", cfg, cfg.run)
    cfg.run.storage = f"s3://{BUCKET}/runs"
    with pytest.raises(ConfigError, match=r"corpus.root='../shared/data' is relative.*does not exist.*absolute"):
        check_submitted_paths(cfg)
    (tmp_path / "data").mkdir()
    cfg.corpus.root = "data"  # uploaded with the working directory: there it is
    check_submitted_paths(cfg)
    cfg.corpus.root = "/mnt/data"
    check_submitted_paths(cfg)

    # A relative data.root is not refused when data.path is absolute: the root is then unused.
    from ray_med.training.config import FinetuneConfig

    fcfg = FinetuneConfig()
    fcfg.run.storage, fcfg.corpus.root = "/mnt/runs", "/mnt/data"
    with pytest.raises(ConfigError, match=r"data.root='../shared/data' is relative"):
        check_submitted_paths(fcfg)
    fcfg.data.path = "/mnt/data/pubmedqa.json"
    check_submitted_paths(fcfg)


@pytest.mark.ray
@pytest.mark.slow
def test_downstream_reads_and_writes_file_uris(ray_session, shared_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, job_main) -> None:
    """The downstream stage on ``file://`` storage: its base model from a URI, every output to one."""
    from ray_med.adapters.classifier import check_classifier_dir, load_classifier
    from ray_med.data import read_records
    from ray_med.models import build_model, save_pretrained, train_bpe_tokenizer
    from ray_med.serving.config import ServeAppConfig

    monkeypatch.setenv("RAY_MED_CACHE", str(tmp_path / "cache"))
    notes = read_records("mtsamples", str(shared_data / "mtsamples/mtsamples_400.csv"), on_error="skip").records
    tok = train_bpe_tokenizer([r.text for r in notes[:100]], vocab_size=300)
    store = Storage.parse(f"file://{tmp_path}/store")
    with store.local_dir("base/model") as d:
        save_pretrained(build_model("tiny-llama", vocab_size=len(tok)), d, tokenizer=tok)
    model_uri = store.join("base/model")
    assert job_main("finetune")([
        "--config", str(REPO / "jobs/configs/finetune/tiny_downstream.yaml"), f"model.path={model_uri}",
        "domain_adapter=null", f"data.root={shared_data}", f"run.storage={store.uri}", "run.name=down",
        "train.epochs=1", "train.max_length=64", "bootstrap=20", "merge=true", "scaling.num_workers=0",
    ]) == 0
    out = tmp_path / "store" / "down"
    for folder in ("adapter", "merged", "plots"):
        assert (out / folder / MARKER).is_file(), folder
    assert json.loads((out / "metrics.json").read_text())["task"] == "pubmedqa_rf"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 50
    assert not list(out.glob("*.tmp-*")) and not Path("file:").exists()
    meta = check_classifier_dir(out / "adapter")
    assert meta["base_model"] == model_uri  # where a reader finds it, not this machine's cache
    assert check_classifier_dir(out / "merged")["base_model"] == store.join("down/merged/model")

    # Serving takes the classifier by its URI: a local copy whose base is a local copy too.
    local = ServeAppConfig(classifiers={"rf": store.join("down/adapter")}).localized()
    folder = local.classifiers["rf"]
    assert folder.startswith(str(tmp_path / "cache"))
    assert check_classifier_dir(folder)["base_model"].startswith(str(tmp_path / "cache"))
    model, loaded = load_classifier(folder)
    assert loaded["labels"] == meta["labels"] and sum(p.numel() for p in model.head.parameters()) > 0


def _cli_env(s3_env: dict[str, str], cache: Path) -> dict[str, str]:
    env = {**os.environ, **s3_env, "RAY_MED_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)  # an embedded Ray of its own
    return env


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "file"])
def test_pipeline_on_uri_storage(scheme: str, request: pytest.FixtureRequest, shared_data: Path,
                                 tiny_stage_overrides: list[str], tmp_path: Path) -> None:
    """Every stage writes to the URI and reads the stages before it from it (tests/pipeline: a half-written one is redone)."""
    import pyarrow.fs as pafs

    if scheme == "s3":
        s3_env = request.getfixturevalue("s3_server")
        root, prefix = f"s3://{BUCKET}/pipeline", f"{BUCKET}/pipeline"
        fs = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], access_key="testing",
                               secret_key="testing", region="us-east-1")
    else:
        s3_env = {}
        (tmp_path / "store").mkdir()
        root, prefix, fs = f"file://{tmp_path}/store/pipeline", f"{tmp_path}/store/pipeline", pafs.LocalFileSystem()
    env = _cli_env(s3_env, tmp_path / "cache")
    args = [
        sys.executable, "jobs/pipeline.py", "--config", "jobs/configs/pipeline/tiny.yaml",
        f"run.storage={root}", f"corpus.root={shared_data}", "tokenizer.vocab_size=1024", "run.num_cpus=2",
        *tiny_stage_overrides,
    ]
    # Every stage on S3; on file:// the text stages only (the storage code is the same, and the
    # image stages' storage round trip is S3's to show): it keeps the suite's time down.
    image_stages = scheme == "s3"
    if not image_stages:
        args += ["multimodal.enabled=false", "serve_vlm.enabled=false", "federated.enabled=false",
                 "inject.enabled=false"]
    # The sweep writes through the same Storage and Tune's own URI support (tests/tuning runs one on a
    # file:// URI); here it would only add its trials' time.
    args.append("sweep.enabled=false")
    run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert not (REPO / "s3:").exists() and not (REPO / "file:").exists()  # no URI ever became a local path

    files = {i.path[len(f"{prefix}/"):] for i in
             fs.get_file_info(pafs.FileSelector(prefix, recursive=True)) if i.type == pafs.FileType.File}
    runs = {p.split("/", 1)[0].rsplit("-", 1)[0]: p.split("/", 1)[0] for p in files}
    outputs = [("corpus", "tokenizer"), ("pretrain", "model"), ("finetune-domain", "adapter"), ("finetune", "adapter")]
    for stage, output in outputs + ([("multimodal", "model"), ("federated", "global/image"), ("inject", "model")]
                                    if image_stages else []):
        assert f"{runs[stage]}/{output}/{MARKER}" in files, (stage, sorted(files))
    assert f"{runs['pretrain']}/model/model.safetensors" in files
    assert {f"{runs['finetune']}/metrics.json", f"{runs['finetune']}/predictions.jsonl"} <= files
    with fs.open_input_stream(f"{prefix}/{runs['finetune']}/adapter/classifier.json") as f:
        meta = json.loads(f.read())
    assert meta["base_model"] == f"{root}/{runs['pretrain']}/model" and meta["domain_adapter"] == "domain"

    # Each stage read the one before from the storage, through the download cache.
    for uri in (f"{root}/{runs['corpus']}/tokenizer", f"{root}/{runs['pretrain']}/model",
                f"{root}/{runs['finetune-domain']}/adapter", f"{root}/{runs['finetune']}/adapter"):
        assert f"downloaded {uri} to {tmp_path / 'cache'}" in log
    served = run.stdout.split("== stage: serve ==")[1]
    assert "pubmedqa_rf: " in served and "mtsamples (lora)" in served and "HTTP " not in served
    if image_stages:  # the multimodal model was read back from the storage and served (a second app, same Serve)
        assert f"downloaded {root}/{runs['multimodal']}/model to {tmp_path / 'cache'}" in log
        served_vlm = run.stdout.split("== stage: serve_vlm ==")[1]
        assert "gold label" in served_vlm and "task pneumonia: " in served_vlm and "HTTP " not in served_vlm
        # The federation's round checkpoint and global encoder went to the storage too.
        assert f"{runs['federated']}/checkpoint/global.safetensors" in files
        assert f"{runs['federated']}/rounds.json" in files
        # evaluate.py federated reads the global encoder straight from the storage URI.
        ev = subprocess.run([sys.executable, "jobs/evaluate.py", "federated", "--model",
                             f"{root}/{runs['federated']}/global", "--task", "pneumonia", "--format", "medmnist",
                             "--data", str(shared_data / "pneumoniamnist/pneumoniamnist_trainval.npz"),
                             "--split", "val", "--bootstrap", "20"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
        assert ev.returncode == 0, (ev.stdout + ev.stderr)[-3000:]
        assert json.loads(ev.stdout.strip().splitlines()[-1])["n"] == 270
        # The injection stage read the federated encoders from the storage (the federation's folders are its
        # only copy) and wrote its model and folded LoRAs there.
        assert {f"{runs['inject']}/folded/pneumonia/adapter_config.json", f"{runs['inject']}/metrics.json"} <= files
    else:
        assert "multimodal" not in runs and "federated" not in runs

    # The same command again: every stage's outputs are complete in the storage, so all are reused.
    # (On S3 only: reuse reads the same Storage.complete on either URI, and a second pipeline
    # process costs half a minute of the suite.)
    if image_stages:
        again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
        assert again.stdout.count("cached: ") == 9 and "rerun:" not in again.stdout
