"""Bad federated configs fail in one line before any actor (or Ray) starts; the readers of the numeric modalities."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_med.config import load_config
from ray_med.data import read_records
from ray_med.data.config import resolve_path
from ray_med.errors import RayMedError
from ray_med.federated.config import FederatedConfig
from ray_med.federated.job import check_config, client_names

REPO = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str, config: str = "tiny_pneumonia_fedavg.yaml") -> FederatedConfig:
    cfg = load_config(FederatedConfig, REPO / "jobs/configs/federated" / config, list(overrides))
    cfg.data_root = str(REPO.parent / "shared" / "data")
    return cfg


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.name=fedsgd"], "unknown strategy 'fedsgd'"),
    (["strategy.name=fedprox", "strategy.mu=0"], "fedprox needs strategy.mu > 0"),
    (["partition.scheme=zipf"], "unknown partition 'zipf'"),
    (["modalities.image.encoder=resnet"], "modality image: unknown encoder 'resnet'"),
    (["modalities.image.task=breast_cancer"], "modality image: task breast_cancer reads tabular inputs"),
    (["modalities.image.path=nope.npz"], "data file not found"),
    (["clients.min_per_round=9"], "min_per_round 9 exceeds the 5 clients"),
    (["clients.fraction=0"], "clients.fraction must be in (0, 1]"),
])
def test_bad_config_is_one_clear_error(overrides: list[str], message: str, shared_data) -> None:
    with pytest.raises(RayMedError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check_config(_cfg(*overrides))


def test_a_modality_no_site_holds_fails_before_any_actor(shared_data) -> None:
    cfg = _cfg(config="tiny_multimodal.yaml")
    assert client_names(cfg)["hospital_c"] == ["tabular", "signal"]
    cfg.clients.sites = [s for s in cfg.clients.sites if "signal" not in s.modalities]
    with pytest.raises(RayMedError, match="modality signal: no client holds it"):
        check_config(cfg)
    cfg.clients.sites[0].modalities.append("audio")
    with pytest.raises(RayMedError, match="site hospital_a holds modality 'audio'"):
        check_config(cfg)


def test_unknown_config_key_is_refused() -> None:
    with pytest.raises(RayMedError, match="stratgy"):
        _cfg("stratgy.name=fedavg")


def test_numeric_readers_read_the_real_table_and_the_fixture() -> None:
    rows = read_records("breast_cancer_csv", resolve_path("pkg://sklearn/datasets/data/breast_cancer.csv")).records
    assert len(rows) == 569 and sum(r.label == "malignant" for r in rows) == 212
    assert len(rows[0].meta["features"]) == 30
    beats = read_records("mitbih_csv", str(REPO / "tests/fixtures/mitbih/mitbih_sample.csv")).records
    assert len(beats) == 250 and {r.label for r in beats} == {"N", "S", "V", "F", "Q"}
    assert len(beats[0].meta["features"]) == 187


def test_a_malformed_numeric_row_is_a_record_error(tmp_path) -> None:
    bad = tmp_path / "beats.csv"
    bad.write_text(",".join(["0.5"] * 187) + ",7\n" + ",".join(["0.1"] * 10) + "\n")
    with pytest.raises(RayMedError, match="line 1: .*class one of 0..4"):
        read_records("mitbih_csv", str(bad))
    got = read_records("mitbih_csv", str(bad), on_error="skip")
    assert got.records == [] and got.skipped == 2



def test_text_longer_than_the_encoders_positions_is_refused(shared_data) -> None:
    with pytest.raises(RayMedError, match="max_length 600 exceeds the encoders' 512 positions"):
        check_config(_cfg("modalities.text.max_length=600", config="tiny_multimodal.yaml"))
