"""The cluster files, validated offline: launcher configs (Ray's own schema), KubeRay manifests, the image.

No Ray cluster: the launcher configs go through the cluster launcher's own
``prepare_config`` + ``validate_config``, the manifests through the strict model of
``ray_med.cluster.kuberay``, serveConfigV2 through Serve's schema and ray_med's strict app
args, and the RayJobs' entrypoints through the jobs' own strict config loading. Each
rule is also shown failing, on a copy of the repository's cluster files with one field
broken.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ray_med.cluster import kuberay
from ray_med.cluster.kuberay import RayJob, RayService
from ray_med.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))
MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
FEDERATED = REPO / "jobs" / "configs" / "federated" / "fedkim_5clients.yaml"

# ray.autoscaler._private.util is a private API: its prepare_config/validate_config were read
# and checked for Ray 2.60.0 only (prepare fills the defaults that validate requires).
PRIVATE_API_CHECKED_FOR = "2.60.0"


def _hospitals() -> set[str]:
    sites = yaml.safe_load(FEDERATED.read_text())["clients"]["sites"]
    return {name for site in sites for name in site["resources"]}


def test_there_are_cluster_files() -> None:
    assert [p.name for p in LAUNCHERS] == ["aws-gpu.yaml", "gcp-gpu.yaml"]
    kinds = sorted(type(kuberay.load_manifest(p)).__name__ for p in MANIFESTS)
    assert kinds == ["RayCluster"] + ["RayJob"] * 4 + ["RayService"] * 2
    assert _hospitals() == {f"hospital_{c}" for c in "abcde"}


# --- launcher configs: Ray's own validation ----------------------------------------------


def _ray_validate(config: dict) -> None:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert ray.__version__ == PRIVATE_API_CHECKED_FOR, (
        f"Ray {ray.__version__} is installed, but these tests call ray.autoscaler._private.util "
        f"(prepare_config, validate_config), a private API checked for Ray {PRIVATE_API_CHECKED_FOR} only: "
        "re-read it for the new Ray, then update PRIVATE_API_CHECKED_FOR")
    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_launcher_validation_api_is_the_one_checked() -> None:
    import ray

    assert ray.__version__ == PRIVATE_API_CHECKED_FOR, (
        f"ray.autoscaler._private.util (prepare_config, validate_config) is a private API, checked for Ray "
        f"{PRIVATE_API_CHECKED_FOR} only; Ray {ray.__version__} is installed: re-read it, then update "
        "PRIVATE_API_CHECKED_FOR")


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    _ray_validate(config)
    types = config["available_node_types"]
    gpu = {n: t["resources"].get("GPU", 0) for n, t in types.items()}
    assert max(gpu.values()) == 8 and 1 in gpu.values()  # an 8-GPU type and a 1-GPU type
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    # One node type per hospital, at most one node each: a client pinned to {hospital_X: 1} gets its own node.
    for hospital in _hospitals():
        holders = [t for t in types.values() if hospital in t["resources"]]
        assert len(holders) == 1 and holders[0]["max_workers"] == 1, hospital
    assert config["max_workers"] == sum(t.get("max_workers", 0) for t in types.values())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
@pytest.mark.parametrize("break_it", [
    lambda c: c.update(idle_timeout_minuts=5),                                   # a typo'd top-level key
    lambda c: next(iter(c["available_node_types"].values())).update(min_worker=1),  # a typo'd node-type key
    lambda c: c["docker"].update(imagee=c["docker"]["image"]),                   # a typo'd docker key
    lambda c: c.update(max_workers="25"),                                        # a wrong type
    lambda c: c.update(head_node_type="no_such_type"),                           # a head type that is not there
], ids=["top-level", "node-type", "docker", "type", "head-type"])
def test_rays_validation_rejects_a_broken_copy(path: Path, break_it: Callable[[dict], None]) -> None:
    import jsonschema

    config = yaml.safe_load(path.read_text())
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(config)


# --- KubeRay manifests ------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_the_strict_model(path: Path) -> None:
    manifest = kuberay.load_manifest(path)
    spec = manifest.cluster
    assert spec.rayVersion == kuberay.expectations(REPO).ray_version
    assert spec.authOptions is not None and spec.authOptions.mode == "token"
    if isinstance(manifest, RayJob):
        assert manifest.spec.shutdownAfterJobFinishes and manifest.spec.ttlSecondsAfterFinished > 0


def test_the_repository_passes_the_check() -> None:
    lines = kuberay.check_repo(REPO)
    exp = kuberay.expectations(REPO)
    assert len(lines) == len(MANIFESTS) + len(LAUNCHERS) + 1
    assert f"Ray {exp.ray_version}, Python {exp.python}, image registry.example.com/ray-med:{exp.image_tag}" in lines[-1]


def test_versions_agree_with_the_installed_ray_and_the_dockerfile() -> None:
    import ray

    exp = kuberay.expectations(REPO)
    # The venv, the image, the manifests and the launcher run one Ray: the pin.
    assert exp.ray_version == ray.__version__
    assert exp.image_tag == f"{exp.ray_version}-py{exp.python.replace('.', '')}-gpu"
    assert f"FROM rayproject/ray:{exp.image_tag}\n" in (REPO / "cluster" / "Dockerfile").read_text()
    assert exp.workdir == "/home/ray/ray_med" and exp.runtime_env == yaml.safe_load(
        (REPO / "cluster" / "runtime_env.yaml").read_text())


def test_the_standing_cluster_has_the_launchers_groups() -> None:
    raycluster = kuberay.load_manifest(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    groups = {g.groupName: g for g in raycluster.spec.workerGroupSpecs}
    gpus = {name: g.template.spec.containers[0].resources.limits.get("nvidia.com/gpu", 0) for name, g in groups.items()}
    assert gpus["gpu-8xh100"] == 8 and gpus["gpu-1xl4"] == 1 and gpus["cpu"] == 0
    offered = {r: name for name, g in groups.items() for r in kuberay.ray_start_resources(g.rayStartParams)}
    hospitals = {r: g for r, g in offered.items() if r.startswith("hospital_")}
    assert set(hospitals) == _hospitals() and all(groups[g].maxReplicas == 1 for g in hospitals.values())
    # The federated server's pool asks for federated_pool: a CPU group offers it, no hospital does.
    assert offered.pop("federated_pool") == "cpu" and set(offered) == set(hospitals)
    assert all(g.minReplicas == 0 for g in groups.values()) and raycluster.spec.enableInTreeAutoscaling


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayjob-")], ids=lambda p: p.name)
def test_rayjob_entrypoint_loads_its_config_strictly(path: Path) -> None:
    """The entrypoint is a README `ray job submit` line: the job's own config loading accepts it."""
    from ray_med.config import load_config
    from ray_med.registry import get_job

    job = kuberay.load_manifest(path)
    python, script, flag, config, *overrides = shlex.split(job.spec.entrypoint)
    assert (python, flag) == ("python", "--config")
    cfg = load_config(get_job(Path(script).stem).config, REPO / config, overrides)
    assert cfg.run.storage.startswith("s3://")


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayservice-")], ids=lambda p: p.name)
def test_serve_config_v2_is_the_serve_file_rendered(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from ray_med.config import from_dict
    from ray_med.serving.config import ServeAppConfig

    service = kuberay.load_manifest(path)
    assert isinstance(service, RayService)
    serve_file = service.metadata.annotations[kuberay.SERVE_CONFIG_ANNOTATION]
    assert service.spec.serveConfigV2 == kuberay.serve_config_v2(serve_file, REPO)
    rendered = yaml.safe_load(service.spec.serveConfigV2)
    ServeDeploySchema.model_validate(rendered)  # the check KubeRay's Serve submission gets
    app = rendered["applications"][0]
    assert from_dict(ServeAppConfig, app["args"], where=str(path)).auth.api_key_env == "RAY_MED_API_KEY"
    # Exactly two changes from the Serve file: the host, and the API key.
    original = yaml.safe_load((REPO / serve_file).read_text())
    assert rendered["http_options"].pop("host") == "0.0.0.0" and original["http_options"].pop("host") == "127.0.0.1"
    assert app["args"].pop("auth") == {"api_key_env": "RAY_MED_API_KEY"} and "auth" not in original["applications"][0]["args"]
    assert rendered == original


def test_ray_start_resources_follow_the_shell_kuberay_uses() -> None:
    assert kuberay.ray_start_resources({"resources": '"{\\"hospital_a\\": 1}"'}) == {"hospital_a": 1.0}
    assert kuberay.ray_start_resources({"num-cpus": "0"}) == {}
    for bad in ['{"hospital_a": 1}', '"{\\"hospital_a\\": -1}"', '"{\\"hospital_a\\": 1}', "'[1]'"]:
        with pytest.raises(ValueError, match="rayStartParams.resources"):
            kuberay.ray_start_resources({"resources": bad})


def test_render_service_rewrites_a_stale_serve_config_and_keeps_comments(tmp_path: Path) -> None:
    root = _copy_repo(tmp_path)
    path = root / "cluster" / "kuberay" / "rayservice-meditron-7b.yaml"
    fresh = path.read_text()
    path.write_text(kuberay.replace_serve_config(fresh, "applications: []\n"))
    with pytest.raises(ConfigError, match="serveConfigV2 differs"):
        kuberay.check_repo(root)
    assert kuberay.main(["render-service", "--root", str(root)]) == 0
    assert path.read_text() == fresh  # comments and everything else as they were
    assert kuberay.render_service(path, root) is False
    kuberay.check_repo(root)


# --- every rule fails on a copy with one field broken -----------------------------------


def _copy_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root)
    shutil.copytree(REPO / "cluster", root / "cluster")
    shutil.copytree(REPO / "jobs", root / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    return root


K = "cluster/kuberay/"
BROKEN = {
    # file, old text, new text, the error it must raise
    "rayjob-unknown-field": (K + "rayjob-pretrain.yaml", "  shutdownAfterJobFinishes: true",
                             "  shutdownAfterJobFinishes: true\n  shutdownAfterJobFinish: true", "unknown field"),
    "rayjob-no-shutdown": (K + "rayjob-pretrain.yaml", "  shutdownAfterJobFinishes: true\n  ttlSecondsAfterFinished: 600\n",
                           "", "shutdownAfterJobFinishes must be true"),
    "rayjob-shutdown-false": (K + "rayjob-sweep.yaml", "shutdownAfterJobFinishes: true", "shutdownAfterJobFinishes: false",
                              "needs shutdownAfterJobFinishes"),
    "rayjob-no-ttl": (K + "rayjob-finetune.yaml", "  ttlSecondsAfterFinished: 600\n", "", "set ttlSecondsAfterFinished"),
    "rayjob-http-mode": (K + "rayjob-finetune.yaml", "submissionMode: K8sJobMode", "submissionMode: HTTPMode",
                         "K8sJobMode"),
    "rayjob-bad-mode": (K + "rayjob-finetune.yaml", "submissionMode: K8sJobMode", "submissionMode: K8SJobMode",
                        "submissionMode"),
    "rayjob-runtime-env": (K + "rayjob-pretrain.yaml", 'HF_HUB_OFFLINE: "1"', 'HF_HUB_OFFLINE: "0"',
                           "differs from cluster/runtime_env.yaml"),
    "rayjob-working-dir": (K + "rayjob-pretrain.yaml", "working_dir: /home/ray/ray_med", "working_dir: /tmp",
                           "working_dir"),
    "rayjob-config-typo": (K + "rayjob-sweep.yaml", "llama2_7b_mimic_mor_gpu.yaml", "llama2_7b_mimic_mor_gp.yaml",
                           "not in the repository"),
    "rayjob-relative-storage": (K + "rayjob-finetune.yaml", "run.storage=s3://my-bucket/ray_med/runs", "run.storage=runs",
                                "run.storage"),
    "rayjob-missing-hospital": (K + "rayjob-federated.yaml", "resources: '\"{\\\"hospital_e\\\": 1}\"'",
                                "resources: '\"{\\\"hospital_f\\\": 1}\"'", "hospital_e"),
    "rayjob-no-pool-group": (K + "rayjob-federated.yaml", "resources: '\"{\\\"federated_pool\\\": 4}\"'",
                             "resources: '\"{\\\"other_pool\\\": 4}\"'", "federated_pool"),
    "rayjob-resources-unquoted": (K + "rayjob-federated.yaml", "resources: '\"{\\\"hospital_e\\\": 1}\"'",
                                  "resources: '{\"hospital_e\": 1}'", "shell splits it"),
    "raycluster-typo": (K + "raycluster.yaml", "minReplicas: 0", "minReplica: 0",
                        "[0].minReplica: unknown field (not a KubeRay field these manifests use); "
                        "did you mean 'minReplicas'?"),
    "raycluster-min-over-max": (K + "raycluster.yaml", "minReplicas: 0\n      maxReplicas: 4",
                                "minReplicas: 5\n      maxReplicas: 4", "minReplicas 5 > maxReplicas 4"),
    "raycluster-quantity": (K + "raycluster.yaml", "memory: 16Gi", "memory: 16GB", "Kubernetes quantity"),
    "raycluster-param-not-string": (K + "raycluster.yaml", 'num-cpus: "0"', "num-cpus: 0", "valid string"),
    "raycluster-container-typo": (K + "raycluster.yaml", "- name: ray-head\n            image:",
                                  "- name: ray-head\n            imagee:", "containers[0].imagee: unknown field"),
    "raycluster-no-auth": (K + "raycluster.yaml", "  authOptions:\n    mode: token\n", "", "token authentication is off"),
    "raycluster-ray-version": (K + "raycluster.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.59.0"',
                               "not the pinned Ray"),
    "raycluster-image-tag": (K + "raycluster.yaml", "ray-med:2.60.0-py311-gpu\n            ports",
                             "ray-med:2.59.0-py311-gpu\n            ports", "head container ray-head: image"),
    "raycluster-undeclared-volume": (K + "raycluster.yaml", "{name: shm, mountPath: /dev/shm}",
                                     "{name: shmem, mountPath: /dev/shm}", "does not declare"),
    "rayservice-edited": (K + "rayservice-meditron-7b.yaml", "max_batch_size: 16", "max_batch_size: 8",
                          "serveConfigV2 differs"),
    "rayservice-no-api-key-env": (K + "rayservice-medpalm-m-7b.yaml",
                                  "      - groupName: cpu\n        replicas: 1\n        minReplicas: 1\n        maxReplicas: 4\n"
                                  "        rayStartParams: {}\n        template:\n          spec:\n            containers:\n"
                                  "              - name: ray-worker\n                image: registry.example.com/ray-med:"
                                  "2.60.0-py311-gpu\n                env:\n                  - name: RAY_MED_API_KEY\n",
                                  "      - groupName: cpu\n        replicas: 1\n        minReplicas: 1\n        maxReplicas: 4\n"
                                  "        rayStartParams: {}\n        template:\n          spec:\n            containers:\n"
                                  "              - name: ray-worker\n                image: registry.example.com/ray-med:"
                                  "2.60.0-py311-gpu\n                env:\n                  - name: OTHER_KEY\n",
                                  "lacks env"),
    "serve-file-edited": ("cluster/serve/medpalm_m_7b.yaml", "max_batch_size: 16", "max_batch_size: 8",
                          "serveConfigV2 differs"),
    "dockerfile-ray-version": ("cluster/Dockerfile", "FROM rayproject/ray:2.60.0-py311-gpu",
                               "FROM rayproject/ray:2.59.0-py311-gpu", "has Ray 2.59.0, but pyproject.toml pins"),
    "dockerfile-python": ("cluster/Dockerfile", "FROM rayproject/ray:2.60.0-py311-gpu",
                          "FROM rayproject/ray:2.60.0-py39-gpu", "requires-python"),
    "dockerfile-no-token-auth": ("cluster/Dockerfile", "ENV RAY_AUTH_MODE=token", "ENV RAY_AUTH_MODE=disabled",
                                 "no ENV RAY_AUTH_MODE=token"),
    "dockerfile-workdir": ("cluster/Dockerfile", "WORKDIR /home/ray/ray_med", "WORKDIR /app", "working_dir"),
    "pyproject-pin": ("pyproject.toml", '"ray[train,serve,tune]==2.60.0"', '"ray[train,serve,tune]==2.61.0"',
                      "pins ray==2.61.0"),
    "launcher-image": ("cluster/launcher/aws-gpu.yaml", "ray-med:2.60.0-py311-gpu", "ray-med:latest",
                       "not the cluster image"),
    "launcher-other-registry": ("cluster/launcher/gcp-gpu.yaml", "registry.example.com/ray-med",
                                "us-docker.pkg.dev/p/r/ray-med", "images"),
    "launcher-start-without-token": ("cluster/launcher/gcp-gpu.yaml", "RAY_AUTH_MODE=token ray start --head",
                                     "ray start --head", "without RAY_AUTH_MODE=token"),
    "launcher-no-run-option": ("cluster/launcher/aws-gpu.yaml", "    - -e RAY_AUTH_MODE=token\n", "",
                               "-e RAY_AUTH_MODE=token"),
    "launcher-no-token-mount": ("cluster/launcher/aws-gpu.yaml", "  /home/ray/.ray/auth_token: ~/.ray/auth_token\n",
                                "  /home/ray/.ray_token: ~/.ray/auth_token\n", "auth token"),
    "launcher-missing-hospital": ("cluster/launcher/gcp-gpu.yaml", '{"CPU": 16, "hospital_c": 1}', '{"CPU": 16}',
                                  "hospital_c"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_check_fails_on_a_copy_with_one_field_broken(case: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_repo(tmp_path)
    rel, old, new, error = BROKEN[case]
    path = root / rel
    text = path.read_text()
    assert text.count(old) >= 1, f"{case}: {old!r} is not in {rel}, so nothing would be broken"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=re.escape(error)):
        kuberay.check_repo(root)
    # The command line: one line on stderr and exit code 2.
    assert kuberay.main(["check", "--root", str(root)]) == kuberay.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("kuberay check: error: ") and err.count("\n") == 1


def test_the_unbroken_copy_passes_and_the_cli_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_repo(tmp_path)
    assert kuberay.main(["check", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "token authentication on" in out.splitlines()[-1]
    assert kuberay.main(["check", "--root", str(tmp_path)]) == kuberay.EXIT_USER_ERROR
    assert "run from the repository root" in capsys.readouterr().err
