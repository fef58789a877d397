"""Strict configs: unknown keys, wrong types, overrides, and every shipped YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ray_med.config import apply_overrides, config_hash, describe, from_dict, load_config, parse_override
from ray_med.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    num_workers: int = 1
    """Workers."""
    use_gpu: bool = False
    """GPUs or not."""
    lr: float = 3e-4
    """Learning rate."""


@dataclass
class Item:
    name: str
    weight: float | None = None


@dataclass
class Outer:
    trainer: Inner = field(default_factory=Inner)
    """Trainer settings."""
    mode: Literal["a", "b"] = "a"
    items: list[Item] = field(default_factory=list)
    tags: dict[str, int] = field(default_factory=dict)
    path: str | None = None


def test_defaults_and_nested_values(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  num_workers: 4\n  lr: 1e-3\nitems:\n  - {name: x, weight: 2}\n")
    cfg = load_config(Outer, f)
    assert cfg.trainer.num_workers == 4
    assert cfg.trainer.lr == 1e-3  # YAML reads "1e-3" as a string; float fields accept it
    assert cfg.trainer.use_gpu is False
    assert cfg.items == [Item(name="x", weight=2.0)]
    assert isinstance(cfg.items[0].weight, float)


def test_unknown_key_names_the_key_and_lists_the_valid_ones(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  num_wrkers: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, f)
    msg = str(exc.value)
    assert "'trainer.num_wrkers'" in msg
    assert "Did you mean 'num_workers'" in msg
    assert "num_workers, use_gpu, lr" in msg
    assert str(f) in msg


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'trainr'.*Valid keys at the top level: trainer, mode"):
        from_dict(Outer, {"trainr": {}})


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"trainer": {"num_workers": "two"}}, "trainer.num_workers", "int"),
        ({"trainer": {"num_workers": 2.5}}, "trainer.num_workers", "int"),
        ({"trainer": {"use_gpu": 1}}, "trainer.use_gpu", "bool"),
        ({"trainer": {"lr": "fast"}}, "trainer.lr", "float"),
        ({"trainer": 3}, "trainer", "mapping"),
        ({"items": {"name": "x"}}, "items", "list"),
        ({"items": [{"name": 5}]}, "items.0.name", "str"),
        ({"tags": {"a": "b"}}, "tags.a", "int"),
    ],
)
def test_wrong_type_names_key_and_expected_type(data: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict(Outer, data)
    assert f"'{key}'" in str(exc.value)
    assert expected in str(exc.value)


def test_literal_and_required_fields() -> None:
    with pytest.raises(ConfigError, match=r"'mode' must be one of 'a', 'b', got 'c'"):
        from_dict(Outer, {"mode": "c"})
    with pytest.raises(ConfigError, match=r"'items.0.name' is required"):
        from_dict(Outer, {"items": [{"weight": 1.0}]})


def test_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("items:\n  - {name: x}\n  - {name: y}\n")
    cfg = load_config(
        Outer, f, ["trainer.num_workers=8", "trainer.use_gpu=true", "items.1.weight=0.5", "mode=b", "tags.k=3"]
    )
    assert cfg.trainer.num_workers == 8
    assert cfg.trainer.use_gpu is True
    assert cfg.items[1].weight == 0.5 and cfg.items[0].weight is None
    assert cfg.mode == "b"
    assert cfg.tags == {"k": 3}
    # The file's values survive where not overridden, and the file itself is not changed.
    assert cfg.items[0].name == "x"
    assert "weight" not in f.read_text()


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.gpus'.*override 'trainer.gpus=1'"):
        load_config(Outer, None, ["trainer.gpus=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Outer, None, ["trainer.num_workers"])
    with pytest.raises(ConfigError, match="index 3 is out of range"):
        load_config(Outer, None, ["items.3.name=z"])
    with pytest.raises(ConfigError, match="'trainer.num_workers' expects int"):
        load_config(Outer, None, ["trainer.num_workers=many"])
    with pytest.raises(ConfigError, match="has no key"):
        load_config(Outer, None, ["mode.x=1"])


def test_parse_override_uses_yaml_values() -> None:
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=s3://bucket/x") == (["a"], "s3://bucket/x")


def test_override_creates_missing_sections() -> None:
    data = apply_overrides(Outer, {}, ["trainer.lr=0.1"])
    assert data == {"trainer": {"lr": 0.1}}


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(Outer, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, scalar)


def test_hash_is_stable_and_ignores_excluded_keys() -> None:
    a = from_dict(Outer, {"trainer": {"num_workers": 2}})
    b = from_dict(Outer, {"trainer": {"num_workers": 2}})
    c = from_dict(Outer, {"trainer": {"num_workers": 3}})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)
    assert config_hash(a, exclude=("trainer.num_workers",)) == config_hash(c, exclude=("trainer.num_workers",))


def test_describe_reads_field_docstrings() -> None:
    rows = {key: (tp, default, doc) for key, tp, default, doc in describe(Outer)}
    assert rows["trainer.num_workers"] == ("int", "1", "Workers.")
    assert rows["mode"][0] == "'a' | 'b'"


def test_every_shipped_yaml_loads() -> None:
    """Every YAML under jobs/configs/<job>/ loads strictly into the config class the job registry gives <job>."""
    from ray_med.registry import JOBS

    files = sorted((REPO / "jobs" / "configs").rglob("*.yaml"))
    assert files, "no configs found under jobs/configs"
    for path in files:
        job = path.relative_to(REPO / "jobs" / "configs").parts[0]
        assert job in JOBS, f"{path}: no job '{job}' in the registry"
        load_config(JOBS[job].config, path)


def test_every_job_has_an_entry_point_and_its_default_config_exists() -> None:
    from ray_med.registry import JOBS

    for name, spec in JOBS.items():
        entry = REPO / "jobs" / f"{name.split('.')[0]}.py"
        assert entry.is_file(), f"job {name}: no {entry.relative_to(REPO)}"
        if spec.default_config:
            assert (REPO / spec.default_config).is_file(), f"job {name}: {spec.default_config} is missing"
        spec.function()  # the run function is importable


@dataclass
class Stage:
    enabled: bool = True
    config: str = ""


@dataclass
class WithStages:
    a: Stage = field(default_factory=lambda: Stage(config="a.yaml"))
    b: Stage = field(default_factory=lambda: Stage(config="b.yaml"))


def test_partial_section_keeps_the_fields_own_default() -> None:
    cfg = load_config(WithStages, None, ["a.enabled=false"])
    # 'config' keeps the default the parent gave this field, not Stage's bare "".
    assert cfg.a == Stage(enabled=False, config="a.yaml")
    assert cfg.b == Stage(enabled=True, config="b.yaml")
    assert from_dict(WithStages, {"b": {"config": "c.yaml"}}).b.config == "c.yaml"
