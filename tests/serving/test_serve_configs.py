"""Every Serve config in cluster/serve passes Serve's own schema and ray_med's strict args."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_med.config import from_dict
from ray_med.errors import ConfigError
from ray_med.serving.config import ServeAppConfig
from ray_med.serving.deploy import read_serve_config, with_args, write_serve_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "cluster" / "serve").glob("*.yaml"))
MULTIMODAL = {"tiny_vlm.yaml", "medpalm_m_7b.yaml"}  # a LLaVA folder: no LoRA adapters, no text classifiers


def test_there_are_serve_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "meditron_7b.yaml"} | MULTIMODAL


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid(path):
    config = read_serve_config(path)
    (app,) = config["applications"]
    assert app["import_path"] == "ray_med.serving.app:build_app"
    cfg = from_dict(ServeAppConfig, app["args"], where=str(path))
    assert cfg.model  # paths are checked when deployed, not here
    if path.name in MULTIMODAL:
        assert not cfg.adapters and not cfg.classifiers
    else:
        assert cfg.classifiers
    for part in (cfg.gateway, cfg.lm, cfg.classifier):
        assert part.max_ongoing_requests >= part.max_batch_size * part.max_concurrent_batches


def test_invalid_serve_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    import_path: 42\n    route_prefix: nope\n")
    with pytest.raises(ConfigError, match="not a valid Serve config"):
        read_serve_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_serve_config(tmp_path / "missing.yaml")


def test_filled_in_config_round_trips(tmp_path):
    config = with_args(read_serve_config(REPO / "cluster/serve/tiny.yaml"), model="/models/x")
    out = write_serve_config(config, tmp_path / "serve.yaml")
    assert read_serve_config(out)["applications"][0]["args"]["model"] == "/models/x"
    assert read_serve_config(REPO / "cluster/serve/tiny.yaml")["applications"][0]["args"]["model"] != "/models/x"


def test_replica_placement_options_reach_serve():
    """Custom resources pick a replica's nodes and max_replicas_per_node spreads replicas over
    them (tests/cluster/test_node_loss.py loses one); the gateway hosting the classifiers
    takes the classifiers' resources too."""
    from ray_med.serving.deployments.replica import options

    cfg = from_dict(ServeAppConfig, {"gateway": {"min_replicas": 2, "max_replicas_per_node": 1,
                                                 "resources": {"serve": 1}},
                                     "classifier": {"resources": {"accelerator_type:L4": 0.001}}})
    opts = options(cfg.gateway, cfg, hosts=cfg.classifier)
    assert opts["max_replicas_per_node"] == 1 and opts["num_replicas"] == 2
    assert opts["ray_actor_options"]["resources"] == {"serve": 1, "accelerator_type:L4": 0.001}
    plain = options(cfg.lm, cfg)
    assert "max_replicas_per_node" not in plain and "resources" not in plain["ray_actor_options"]
