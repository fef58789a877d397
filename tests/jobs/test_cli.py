"""Job entry points: --help, --print-config, and clear errors with a non-zero exit (no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def test_help_lists_config_keys_with_docs(capsys: pytest.CaptureFixture[str], job_main) -> None:
    with pytest.raises(SystemExit) as exc:
        job_main("pipeline")(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "tokenizer.vocab_size" in out and "Vocabulary size" in out
    assert "run.storage" in out


def test_print_config_applies_overrides(capsys: pytest.CaptureFixture[str], job_main) -> None:
    code = job_main("pipeline")(["--config", "jobs/configs/pipeline/tiny.yaml", "--print-config", "seq_len=64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "seq_len: 64" in out and "reader: pubmedqa" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tokenizer.vocab_sise=10"], "unknown config key 'tokenizer.vocab_sise'"),
        (["seq_len=long"], "'seq_len' expects int"),
        (["--config", "jobs/configs/pipeline/missing.yaml"], "config file not found"),
        (["run.storage=ftp://x/y"], "unsupported scheme"),
        (["corpus.sources.0.path=nope/missing.json"], "file not found"),
        (["corpus.sources.0.reader=pubmedq"], "unknown reader 'pubmedq'"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch, job_main) -> None:
    # Errors from inside a Ray task surface the same way: reading is the first Ray step.
    monkeypatch.setattr(sys, "argv", ["pipeline"])
    code = job_main("pipeline")([*argv, f"run.storage={tmp_path}"] if "run.storage" not in argv[0] else argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model.path=/nonexistent/base"], "model folder not found: /nonexistent/base"),
        (["domain_adapter=/nonexistent/adapter"], "is not a PEFT adapter folder"),
        (["data.task=pubmedqa-rf"], "unknown task 'pubmedqa-rf'"),
        (["data.path=/nonexistent.json"], "file not found"),
        (["adapter.method=ia3"], "'adapter.method' must be one of"),
    ],
)
def test_finetune_bad_input_fails_before_any_worker(argv, message, capsys, tmp_path, job_main) -> None:
    code = job_main("finetune")([*argv, f"run.storage={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
