"""The KubeRay manifests of ``cluster/kuberay``: a strict model of the fields they use, serveConfigV2, the offline check.

``python -m ray_med.cluster.kuberay check`` (from the repository root) validates every
manifest against :class:`RayCluster`, :class:`RayJob` and :class:`RayService` and checks
what ties the cluster files together:

- ``rayVersion`` is the Ray that ``pyproject.toml`` pins, and ``cluster/Dockerfile``'s base
  image (``rayproject/ray:<ray>-py<python>-<platform>``) carries that Ray and a Python that
  ``requires-python`` allows;
- every image, in the manifests and in ``cluster/launcher/*.yaml``, is our image
  (``<registry>/ray-med``) with the base image's tag, and the same one everywhere;
- token authentication is on: ``authOptions.mode: token`` on every RayCluster spec, and
  ``RAY_AUTH_MODE=token`` plus the mounted token in the launcher configs;
- a RayJob deletes its cluster when done (``shutdownAfterJobFinishes: true`` and an
  explicit ``ttlSecondsAfterFinished``), submits from a submitter pod of our image
  (``K8sJobMode``), uploads the repository copy in the image as its working directory,
  carries ``cluster/runtime_env.yaml``'s settings, and runs a ``jobs/*.py`` with a config
  that exists and an absolute or URI ``run.storage``;
- federated jobs find a worker group for every custom resource their sites ask for;
- a RayService's ``serveConfigV2`` is exactly :func:`serve_config_v2` of the Serve file
  named by its ``ray-med/serve-config`` annotation, and every pod holds the API key's
  environment variable. ``python -m ray_med.cluster.kuberay render-service`` rewrites
  ``serveConfigV2`` from the Serve files.

A failure is one line and exit code 2, as for the jobs. The test suite
(``tests/cluster/test_configs.py``) also runs Ray's own validation of the launcher configs
and Serve's schema on ``serveConfigV2``; this module imports no Ray.

The model covers exactly the KubeRay and Kubernetes fields these manifests use (and
``authOptions.secretName``, which their comments offer), each checked by hand against the OpenAPI schemas of KubeRay v1.7.0's CRDs
(``ray-operator/config/crd/bases/ray.io_rayclusters.yaml``, ``ray.io_rayjobs.yaml`` and
``ray.io_rayservices.yaml``) for its name, type and enum, plus the rules KubeRay's
operator enforces on them (``ray-operator/controllers/ray/utils/validation.go``). An
unknown field fails here as it fails ``kubectl apply`` (strict field validation); a field
KubeRay has but we do not use fails too, and is added here when a manifest needs it.
``authOptions`` needs KubeRay 1.5.1 or later. We write the model by hand because no
maintained PyPI package ships these schemas: KubeRay's own Python clients
(``clients/python-client``, ``clients/python-apiserver-client`` in its repository) are not
published releases and build plain dicts without a schema.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shlex
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ray_med.errors import EXIT_USER_ERROR, ConfigError

IMAGE_NAME = "ray-med"
"""The last path component of our image, whatever the registry (cluster/Dockerfile)."""
SERVE_CONFIG_ANNOTATION = "ray-med/serve-config"
"""A RayService's annotation naming the Serve file its serveConfigV2 is rendered from."""
API_KEY_ENV = "RAY_MED_API_KEY"
"""The gateway's API key variable in a rendered serveConfigV2 (ray_med.serving.config.AuthConfig)."""
TOKEN_AUTH_MIN_RAY = Version("2.52.0")
"""KubeRay refuses ``authOptions.mode: token`` below this Ray (validation.go)."""
NAME_MAX = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
"""KubeRay's name length limits: it appends suffixes to a RayJob's and a RayService's cluster."""

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""PyYAML's safe loader, in C when libyaml is there: parsing is most of a check's time."""

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_BASE_IMAGE = re.compile(r"^rayproject/ray:(?P<tag>(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<pyminor>\d+)-(gpu|cu\d+))$")


# --- the model --------------------------------------------------------------------------


def _quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    return value


def _label(value: str) -> str:
    if len(value) > 63 or not _DNS1123.match(value):
        raise ValueError(f"{value!r} is not a DNS-1123 label (lower case letters, digits and '-', at most 63)")
    return value


Quantity = Annotated[int | str, AfterValidator(_quantity)]
Label = Annotated[str, AfterValidator(_label)]


class _Strict(BaseModel):
    """Unknown fields are errors, as they are to ``kubectl apply`` (strict field validation)."""

    model_config = ConfigDict(extra="forbid")


class ObjectMeta(_Strict):
    name: str
    annotations: dict[str, str] = Field(default_factory=dict)


class SecretRef(_Strict):
    """secretKeyRef of an env var: one key of a Secret."""

    name: str
    key: str


class EnvVarSource(_Strict):
    secretKeyRef: SecretRef


class EnvVar(_Strict):
    name: str
    valueFrom: EnvVarSource


class SecretEnvSource(_Strict):
    name: str
    optional: bool | None = None


class EnvFromSource(_Strict):
    """envFrom: every key of a Secret as an environment variable (storage credentials)."""

    secretRef: SecretEnvSource


class ResourceRequirements(_Strict):
    limits: dict[str, Quantity] = Field(default_factory=dict)
    requests: dict[str, Quantity] = Field(default_factory=dict)


class ContainerPort(_Strict):
    containerPort: int = Field(ge=1, le=65535)
    name: str | None = None


class VolumeMount(_Strict):
    name: str
    mountPath: str
    readOnly: bool | None = None


class Container(_Strict):
    name: Label
    image: str
    env: list[EnvVar] = Field(default_factory=list)
    envFrom: list[EnvFromSource] = Field(default_factory=list)
    ports: list[ContainerPort] = Field(default_factory=list)
    resources: ResourceRequirements | None = None
    volumeMounts: list[VolumeMount] = Field(default_factory=list)


class PVCSource(_Strict):
    claimName: str
    readOnly: bool | None = None


class EmptyDirSource(_Strict):
    medium: Literal["", "Memory"] | None = None


class Volume(_Strict):
    name: Label
    persistentVolumeClaim: PVCSource | None = None
    emptyDir: EmptyDirSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        if (self.persistentVolumeClaim is None) == (self.emptyDir is None):
            raise ValueError(f"volume {self.name}: set exactly one of persistentVolumeClaim, emptyDir")
        return self


class Toleration(_Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PodSpec(_Strict):
    containers: list[Container] = Field(min_length=1)
    volumes: list[Volume] = Field(default_factory=list)
    tolerations: list[Toleration] = Field(default_factory=list)
    restartPolicy: Literal["Always", "OnFailure", "Never"] | None = None

    @model_validator(mode="after")
    def _mounts_name_volumes(self) -> PodSpec:
        declared = {v.name for v in self.volumes}
        for c in self.containers:
            for m in c.volumeMounts:
                if m.name not in declared:
                    raise ValueError(f"container {c.name} mounts volume {m.name!r}, which the pod does not declare "
                                     f"(volumes: {sorted(declared)})")
        return self


class PodTemplate(_Strict):
    spec: PodSpec


def ray_start_resources(params: dict[str, str]) -> dict[str, float]:
    """The custom resources of a group's ``rayStartParams``.

    KubeRay puts ``--resources=<value>`` into the shell command that starts Ray, so the
    value is a JSON object quoted for that shell: ``'"{\\"hospital_a\\": 1}"'`` in YAML.
    A value the shell would split or strip differently fails here, not in a pod's log.
    """
    raw = params.get("resources")
    if raw is None:
        return {}
    try:
        words = shlex.split(raw)
    except ValueError as exc:
        raise ValueError(f"rayStartParams.resources {raw!r}: unbalanced shell quoting ({exc})") from None
    if len(words) != 1:
        raise ValueError(f"rayStartParams.resources {raw!r}: the shell splits it into {len(words)} words; "
                         "quote the JSON object as '\"{\\\"name\\\": 1}\"'")
    try:
        data = json.loads(words[0])
    except json.JSONDecodeError:
        raise ValueError(f"rayStartParams.resources {raw!r}: after shell quoting, {words[0]!r} is not JSON") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for k, v in data.items()
    ):
        raise ValueError(f"rayStartParams.resources {raw!r}: must be a JSON object of non-negative numbers")
    return {k: float(v) for k, v in data.items()}


class HeadGroupSpec(_Strict):
    rayStartParams: dict[str, str] = Field(default_factory=dict)
    template: PodTemplate

    @model_validator(mode="after")
    def _resources_parse(self) -> HeadGroupSpec:
        ray_start_resources(self.rayStartParams)
        return self


class WorkerGroupSpec(_Strict):
    groupName: Label
    replicas: int | None = Field(default=None, ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=0)
    rayStartParams: dict[str, str] = Field(default_factory=dict)
    template: PodTemplate

    @model_validator(mode="after")
    def _replicas_in_range(self) -> WorkerGroupSpec:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"worker group {self.groupName}: minReplicas {self.minReplicas} > maxReplicas "
                             f"{self.maxReplicas}")
        if self.replicas is not None and not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(f"worker group {self.groupName}: replicas {self.replicas} is outside "
                             f"[minReplicas, maxReplicas] = [{self.minReplicas}, {self.maxReplicas}]")
        ray_start_resources(self.rayStartParams)
        return self


class AuthOptions(_Strict):
    mode: Literal["disabled", "token"] | None = None
    secretName: str | None = None


class AutoscalerOptions(_Strict):
    idleTimeoutSeconds: int | None = Field(default=None, ge=0)
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = None


class RayClusterSpec(_Strict):
    rayVersion: str
    enableInTreeAutoscaling: bool | None = None
    autoscalerOptions: AutoscalerOptions | None = None
    authOptions: AuthOptions | None = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _kuberay_rules(self) -> RayClusterSpec:
        names = [g.groupName for g in self.workerGroupSpecs]
        if len(names) != len(set(names)):
            raise ValueError(f"worker group names repeat: {names}")
        try:
            version = Version(self.rayVersion)
        except InvalidVersion:
            raise ValueError(f"rayVersion {self.rayVersion!r} is not a version") from None
        if self.authOptions and self.authOptions.mode == "token" and version < TOKEN_AUTH_MIN_RAY:
            raise ValueError(f"authOptions.mode token needs rayVersion >= {TOKEN_AUTH_MIN_RAY}, got {self.rayVersion}")
        return self

    def groups(self) -> list[tuple[str, dict[str, str], PodSpec]]:
        """(group name, rayStartParams, pod spec) of the head (named ``head``) and every worker group."""
        head = self.headGroupSpec
        return [("head", head.rayStartParams, head.template.spec),
                *((g.groupName, g.rayStartParams, g.template.spec) for g in self.workerGroupSpecs)]


class SubmitterConfig(_Strict):
    backoffLimit: int | None = Field(default=None, ge=0)


class RayJobSpec(_Strict):
    entrypoint: str = Field(min_length=1)
    runtimeEnvYAML: str | None = None
    shutdownAfterJobFinishes: bool = False
    ttlSecondsAfterFinished: int = Field(default=0, ge=0)
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] = "K8sJobMode"
    submitterPodTemplate: PodTemplate | None = None
    submitterConfig: SubmitterConfig | None = None
    rayClusterSpec: RayClusterSpec

    @model_validator(mode="after")
    def _kuberay_rules(self) -> RayJobSpec:
        if self.ttlSecondsAfterFinished > 0 and not self.shutdownAfterJobFinishes:
            raise ValueError("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if self.submissionMode == "SidecarMode" and (self.submitterPodTemplate or self.submitterConfig):
            raise ValueError("SidecarMode supports neither submitterPodTemplate nor submitterConfig")
        if self.runtimeEnvYAML is not None and not isinstance(_yaml_or_error(self.runtimeEnvYAML, "runtimeEnvYAML"), dict):
            raise ValueError("runtimeEnvYAML must be a YAML mapping (a runtime env)")
        return self


class RayServiceSpec(_Strict):
    serveConfigV2: str
    rayClusterConfig: RayClusterSpec

    @model_validator(mode="after")
    def _serve_config_parses(self) -> RayServiceSpec:
        data = _yaml_or_error(self.serveConfigV2, "serveConfigV2")
        if not isinstance(data, dict) or not isinstance(data.get("applications"), list):
            raise ValueError("serveConfigV2 must be a Serve config with an applications list")
        return self


class _Resource(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: str
    metadata: ObjectMeta

    @model_validator(mode="after")
    def _name(self) -> _Resource:
        kind, name = self.kind, self.metadata.name
        if len(name) > NAME_MAX[kind] or not _DNS1035.match(name):
            raise ValueError(f"metadata.name {name!r}: a {kind} name is a DNS-1035 label of at most {NAME_MAX[kind]} "
                             "characters")
        return self


class RayCluster(_Resource):
    kind: Literal["RayCluster"]
    spec: RayClusterSpec

    @property
    def cluster(self) -> RayClusterSpec:
        return self.spec


class RayJob(_Resource):
    kind: Literal["RayJob"]
    spec: RayJobSpec

    @property
    def cluster(self) -> RayClusterSpec:
        return self.spec.rayClusterSpec


class RayService(_Resource):
    kind: Literal["RayService"]
    spec: RayServiceSpec

    @property
    def cluster(self) -> RayClusterSpec:
        return self.spec.rayClusterConfig


Manifest = RayCluster | RayJob | RayService
KINDS: dict[str, type[RayCluster] | type[RayJob] | type[RayService]] = {
    "RayCluster": RayCluster, "RayJob": RayJob, "RayService": RayService}


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_LOADER)


def _yaml_or_error(text: str, what: str) -> Any:
    try:
        return _load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} is not valid YAML: {' '.join(str(exc).split())}") from None


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"


def parse_manifest(data: Any, path: str | Path) -> Manifest:
    """One manifest's data as its model; a mismatch raises ConfigError naming the file and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a manifest is a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{path}: kind {kind!r} is not one of {', '.join(KINDS)} (one KubeRay resource per file)")
    try:
        return KINDS[kind].model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    """The most telling of a validation's errors, in one line: an unknown field first (a typo
    also makes the field it misspells missing), with the missing one it resembles."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err, others = errors[0], len(errors) - 1
    hint = ""
    if err["type"] == "extra_forbidden":
        missing = [str(e["loc"][-1]) for e in errors if e["type"] == "missing" and e["loc"][:-1] == err["loc"][:-1]]
        close = difflib.get_close_matches(str(err["loc"][-1]), missing, n=1)
        if close:
            hint, others = f"; did you mean {close[0]!r}?", others - 1  # the misspelt field is the missing one
    msg = "unknown field (not a KubeRay field these manifests use)" if err["type"] == "extra_forbidden" \
        else err["msg"].removeprefix("Value error, ")
    more = f" (and {others} more)" if others else ""
    return f"{_where(err['loc'])}: {msg}{hint}{more}"


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate one manifest file (one YAML document)."""
    p = Path(path)
    try:
        docs = [d for d in yaml.load_all(p.read_text(encoding="utf-8"), Loader=_LOADER) if d is not None]
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {' '.join(str(exc).split())}") from None
    if len(docs) != 1:
        raise ConfigError(f"{p}: holds {len(docs)} YAML documents; keep one KubeRay resource per file")
    return parse_manifest(docs[0], p)


# --- serveConfigV2 ----------------------------------------------------------------------


def serve_config_v2(path: str | Path, root: str | Path | None = None) -> str:
    """A ``cluster/serve/*.yaml`` file rendered for a RayService's ``serveConfigV2``.

    The Serve file as data, with two changes a Kubernetes Service needs, both of which
    the Serve files' own comments ask for behind a load balancer: the proxies listen on
    0.0.0.0 (KubeRay's serve Service reaches them at the pod's IP, so 127.0.0.1 would
    answer nothing), and an application that sets no ``args.auth`` gets the API key from
    the environment variable :data:`API_KEY_ENV`, since the endpoint is now reachable
    from the network. ``path`` is relative to ``root`` (the repository) when given, and is
    named as given in the rendered text's first line.
    """
    source = Path(root, path) if root is not None else Path(path)
    try:
        data = _load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"Serve config {source}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Serve config {source} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("applications"), list):
        raise ConfigError(f"Serve config {source}: expected a mapping with an applications list")
    data.setdefault("http_options", {})["host"] = "0.0.0.0"
    for app in data["applications"]:
        args = app.setdefault("args", {})
        if isinstance(args, dict) and not args.get("auth"):
            args["auth"] = {"api_key_env": API_KEY_ENV}
    header = (f"# Rendered from {Path(path).as_posix()} by `python -m ray_med.cluster.kuberay render-service`:\n"
              "# edit that file, then render; `check` fails while the two differ.\n")
    return header + yaml.safe_dump(data, sort_keys=False, width=100)


_SERVE_KEY = re.compile(r"^(?P<indent>\s*)serveConfigV2:(?P<rest>.*)$")


def replace_serve_config(text: str, serve_config: str) -> str:
    """``text`` (a RayService manifest) with its serveConfigV2 replaced by a literal block; comments kept."""
    lines = text.splitlines(keepends=True)
    keys = [i for i, line in enumerate(lines) if _SERVE_KEY.match(line)]
    if len(keys) != 1:
        raise ConfigError(f"expected one serveConfigV2 line in the manifest, found {len(keys)}")
    i = keys[0]
    indent = len(_SERVE_KEY.match(lines[i]).group("indent"))
    end = i + 1
    # The old value: the lines indented deeper than the key (blank lines included).
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    while end > i + 1 and not lines[end - 1].strip():  # blank lines after the block stay
        end -= 1
    pad = " " * (indent + 2)
    block = [f"{' ' * indent}serveConfigV2: |\n"]
    block += [f"{pad}{line}\n" if line else "\n" for line in serve_config.rstrip("\n").split("\n")]
    return "".join(lines[:i] + block + lines[end:])


def render_service(path: str | Path, root: str | Path) -> bool:
    """Rewrite a RayService manifest's serveConfigV2 from its Serve file; True when the file changed.

    Only the annotation is read before rendering (the old serveConfigV2 may be empty or
    stale); the rewritten manifest must then pass the whole model before it is written.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    data = _yaml_or_config_error(text, p)
    if not isinstance(data, dict) or data.get("kind") != "RayService":
        raise ConfigError(f"{p}: render-service renders RayService manifests")
    serve_file = _serve_file(data, p, Path(root))
    rendered = serve_config_v2(serve_file, root)
    new = replace_serve_config(text, rendered)
    manifest = parse_manifest(_yaml_or_config_error(new, p), p)
    if manifest.spec.serveConfigV2 != rendered:
        raise ConfigError(f"{p}: the rendered serveConfigV2 does not read back as written; not writing it")
    if new == text:
        return False
    p.write_text(new, encoding="utf-8")
    return True


def _yaml_or_config_error(text: str, path: str | Path) -> Any:
    try:
        return _load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None


def _serve_file(manifest: dict[str, Any] | RayService, path: Path, root: Path) -> str:
    """The Serve file a RayService's annotation names (a path relative to the repository)."""
    if isinstance(manifest, RayService):
        name = manifest.metadata.annotations.get(SERVE_CONFIG_ANNOTATION)
    else:
        name = ((manifest.get("metadata") or {}).get("annotations") or {}).get(SERVE_CONFIG_ANNOTATION)
    if not name:
        raise ConfigError(f"{path}: the RayService has no {SERVE_CONFIG_ANNOTATION} annotation naming the "
                          "cluster/serve/*.yaml file its serveConfigV2 is rendered from")
    if not (root / name).is_file():
        raise ConfigError(f"{path}: annotation {SERVE_CONFIG_ANNOTATION}: {name} does not exist under {root}")
    return name


# --- what ties the cluster files together ----------------------------------------------


@dataclass(frozen=True)
class Expectations:
    """What the cluster files must agree on, read from pyproject.toml, cluster/Dockerfile and cluster/runtime_env.yaml."""

    root: Path
    ray_version: str
    """The Ray that pyproject.toml pins (``ray[...]==X``)."""
    python: str
    """The Python of the Dockerfile's base image, e.g. 3.11."""
    image_tag: str
    """The base image's tag, which our image repeats, e.g. 2.60.0-py311-gpu."""
    workdir: str
    """The repository's path in the image (the Dockerfile's WORKDIR): the RayJobs' working_dir."""
    runtime_env: dict[str, Any]
    """cluster/runtime_env.yaml: what ``ray job submit --runtime-env`` passes, and every RayJob carries."""


def pinned_ray(pyproject: str | Path) -> tuple[str, str]:
    """(Ray version pinned in ``dependencies``, ``requires-python``) of a pyproject.toml."""
    text = Path(pyproject).read_text(encoding="utf-8")
    # A regex, not tomllib: it is not in Python 3.10, which requires-python still allows.
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([^";\s]+)"', text)
    requires = re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.M)
    if len(pins) != 1 or requires is None:
        raise ConfigError(f"{pyproject}: expected one exact Ray pin (ray[...]==X.Y.Z) and requires-python")
    return pins[0], requires.group(1)


def dockerfile_base(dockerfile: str | Path) -> tuple[re.Match[str], str]:
    """(the base image's match of ``rayproject/ray:<ray>-py<python>-<platform>``, the final WORKDIR)."""
    lines = [line.strip() for line in Path(dockerfile).read_text(encoding="utf-8").splitlines()]
    froms = [line.split()[1:] for line in lines if line.upper().startswith("FROM ")]
    workdirs = [line.split(maxsplit=1)[1] for line in lines if line.upper().startswith("WORKDIR ")]
    if len(froms) != 1 or len(froms[0]) != 1:
        raise ConfigError(f"{dockerfile}: expected one plain FROM line, found {froms}")
    match = _BASE_IMAGE.match(froms[0][0])
    if match is None:
        raise ConfigError(f"{dockerfile}: base image {froms[0][0]!r} is not rayproject/ray:<ray>-py<python>-<gpu|cuXXX>")
    if not workdirs:
        raise ConfigError(f"{dockerfile}: no WORKDIR (the repository's path in the image)")
    if not any(line.upper().startswith("ENV ") and "RAY_AUTH_MODE=token" in line for line in lines):
        raise ConfigError(f"{dockerfile}: no ENV RAY_AUTH_MODE=token: every Ray process of the image must "
                          "require the token")
    return match, workdirs[-1]


def expectations(root: str | Path) -> Expectations:
    """Read and cross-check pyproject.toml, cluster/Dockerfile and cluster/runtime_env.yaml under ``root``."""
    root = Path(root)
    if not (root / "cluster" / "kuberay").is_dir():
        raise ConfigError(f"no cluster/kuberay folder under {root.resolve()}: run from the repository root or pass --root")
    ray_version, requires_python = pinned_ray(root / "pyproject.toml")
    base, workdir = dockerfile_base(root / "cluster" / "Dockerfile")
    python = f"{base['py']}.{base['pyminor']}"
    if base["ray"] != ray_version:
        raise ConfigError(f"cluster/Dockerfile: base image rayproject/ray:{base['tag']} has Ray {base['ray']}, but "
                          f"pyproject.toml pins ray=={ray_version}; change them together")
    if Version(python) not in SpecifierSet(requires_python):
        raise ConfigError(f"cluster/Dockerfile: base image Python {python} is outside pyproject.toml's "
                          f"requires-python {requires_python!r}")
    env_path = root / "cluster" / "runtime_env.yaml"
    runtime_env = _load(env_path.read_text(encoding="utf-8")) if env_path.is_file() else None
    if not isinstance(runtime_env, dict):
        raise ConfigError(f"{env_path}: expected a runtime env mapping")
    return Expectations(root, ray_version, python, base["tag"], workdir, runtime_env)


def check_image(image: str, exp: Expectations, where: str) -> None:
    repo, _, tag = image.rpartition(":")
    if repo.rsplit("/", 1)[-1] != IMAGE_NAME or tag != exp.image_tag:
        raise ConfigError(f"{where}: image {image!r} is not the cluster image <registry>/{IMAGE_NAME}:{exp.image_tag} "
                          f"(cluster/Dockerfile's base is rayproject/ray:{exp.image_tag}; our tag repeats it)")


def _entrypoint(job: RayJob, path: Path, exp: Expectations) -> tuple[str, Path]:
    """Check a RayJob's entrypoint (python jobs/X.py --config FILE ... run.storage=...): (job script, config)."""
    try:
        words = shlex.split(job.spec.entrypoint)
    except ValueError as exc:
        raise ConfigError(f"{path}: spec.entrypoint: unbalanced shell quoting ({exc})") from None
    if len(words) < 4 or words[0] != "python" or not re.fullmatch(r"jobs/\w+\.py", words[1]) or "--config" not in words:
        raise ConfigError(f"{path}: spec.entrypoint {job.spec.entrypoint!r} is not "
                          "`python jobs/<job>.py --config jobs/configs/... key=value ...`")
    script, after = words[1], words[words.index("--config") + 1:]
    config = after[0] if after else ""
    for name in (script, config):
        if not name or not (exp.root / name).is_file():
            raise ConfigError(f"{path}: spec.entrypoint names {name or '(no file after --config)'}, which is not in "
                              "the repository (paths are relative to the working directory, the repository)")
    storage = [w.split("=", 1)[1] for w in words if w.startswith("run.storage=")]
    if not storage or not (storage[-1].startswith("/") or "://" in storage[-1]):
        raise ConfigError(f"{path}: spec.entrypoint needs run.storage=<shared storage> (s3://..., gs://... or an "
                          "absolute path every pod mounts): the job's outputs outlive its cluster only there")
    return script, exp.root / config


def _required_resources(config: Path) -> set[str]:
    """The custom resources a federated job asks for: its sites' (clients.sites[*].resources) and
    its server's executor pool's (pool.resources)."""
    data = _load(config.read_text(encoding="utf-8")) or {}
    sites = (data.get("clients") or {}).get("sites") or []
    pool = (data.get("pool") or {}).get("resources") or {}
    return {name for site in sites if isinstance(site, dict) for name in (site.get("resources") or {})} | set(pool)


def check_resources(spec: RayClusterSpec, needed: set[str], where: str) -> None:
    """Every custom resource in ``needed`` is offered by a worker group that can have a pod."""
    offered = {name for g in spec.workerGroupSpecs if g.maxReplicas > 0 for name in ray_start_resources(g.rayStartParams)}
    missing = sorted(needed - offered)
    if missing:
        raise ConfigError(f"{where}: no worker group offers the custom resources {missing} that the federated job "
                          "asks for (rayStartParams resources, with maxReplicas >= 1)")


def check_manifest(manifest: Manifest, path: Path, exp: Expectations) -> set[str]:
    """The project's rules for one manifest (see the module docstring); returns the custom resources it needs."""
    spec, kind, name = manifest.cluster, manifest.kind, manifest.metadata.name
    where = f"{path} ({kind} {name})"
    if spec.rayVersion != exp.ray_version:
        raise ConfigError(f"{where}: rayVersion {spec.rayVersion} is not the pinned Ray {exp.ray_version} "
                          "(pyproject.toml)")
    if spec.authOptions is None or spec.authOptions.mode != "token":
        raise ConfigError(f"{where}: token authentication is off; set authOptions: {{mode: token}} (KubeRay then "
                          "creates the token Secret and sets RAY_AUTH_MODE and RAY_AUTH_TOKEN in every Ray pod)")
    pods = [(group, pod) for group, _, pod in spec.groups()]
    if isinstance(manifest, RayJob) and manifest.spec.submitterPodTemplate is not None:
        pods.append(("submitter", manifest.spec.submitterPodTemplate.spec))
    for group, pod in pods:
        for c in pod.containers:
            check_image(c.image, exp, f"{where} {group} container {c.name}")
    needed: set[str] = set()
    if isinstance(manifest, RayJob):
        needed = _check_job(manifest, path, exp, where)
    if isinstance(manifest, RayService):
        _check_service(manifest, path, exp, where)
    check_resources(spec, needed, where)
    return needed


def _check_job(job: RayJob, path: Path, exp: Expectations, where: str) -> set[str]:
    s = job.spec
    if not s.shutdownAfterJobFinishes:
        raise ConfigError(f"{where}: shutdownAfterJobFinishes must be true: a finished job's cluster, GPUs included, "
                          "otherwise stays until someone deletes the RayJob")
    if "ttlSecondsAfterFinished" not in s.model_fields_set:
        raise ConfigError(f"{where}: set ttlSecondsAfterFinished: how long the finished cluster stays for its logs")
    if "submissionMode" not in s.model_fields_set or s.submissionMode != "K8sJobMode" or s.submitterPodTemplate is None:
        raise ConfigError(f"{where}: use submissionMode: K8sJobMode with a submitterPodTemplate of the cluster image: "
                          "its `ray job submit` uploads the image's repository as the working directory")
    env = _yaml_or_error(s.runtimeEnvYAML or "{}", "runtimeEnvYAML") or {}
    working_dir = env.pop("working_dir", None)
    if working_dir != exp.workdir:
        raise ConfigError(f"{where}: runtimeEnvYAML working_dir is {working_dir!r}; it must be {exp.workdir!r}, the "
                          "repository in the image (cluster/Dockerfile WORKDIR), so jobs/ and configs resolve")
    if env != exp.runtime_env:
        raise ConfigError(f"{where}: runtimeEnvYAML (less working_dir) differs from cluster/runtime_env.yaml: "
                          f"{json.dumps(env, sort_keys=True)} != {json.dumps(exp.runtime_env, sort_keys=True)}")
    script, config = _entrypoint(job, path, exp)
    return _required_resources(config) if script == "jobs/federated.py" else set()


def _check_service(service: RayService, path: Path, exp: Expectations, where: str) -> None:
    serve_file = _serve_file(service, path, exp.root)
    if service.spec.serveConfigV2 != serve_config_v2(serve_file, exp.root):
        raise ConfigError(f"{where}: serveConfigV2 differs from {serve_file} as rendered; edit {serve_file} and run "
                          "`python -m ray_med.cluster.kuberay render-service`")
    apps = _load(service.spec.serveConfigV2)["applications"]
    keys = {((app.get("args") or {}).get("auth") or {}).get("api_key_env") for app in apps} - {None, ""}
    for group, _, pod in service.cluster.groups():
        for c in pod.containers:
            missing = keys - {e.name for e in c.env}
            if missing:
                raise ConfigError(f"{where}: {group} container {c.name} lacks env {sorted(missing)}, the API key the "
                                  "gateway reads (any pod may host a gateway replica)")


def launcher_images(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, image) of every image a launcher config names."""
    docker = config.get("docker") or {}
    out = [(f"docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for name, node in (config.get("available_node_types") or {}).items():
        if (node.get("docker") or {}).get("worker_image"):
            out.append((f"available_node_types.{name}.docker.worker_image", node["docker"]["worker_image"]))
    return out


def check_launcher(path: str | Path, exp: Expectations, needed: Collection[str] = ()) -> list[str]:
    """The project's rules for a launcher config (Ray's schema is checked by the tests): returns its images."""
    p = Path(path)
    config = _load(p.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ConfigError(f"{p}: expected a cluster launcher config mapping")
    images = launcher_images(config)
    if not images:
        raise ConfigError(f"{p}: docker.image is not set; every node runs the cluster image")
    for where, image in images:
        check_image(image, exp, f"{p} {where}")
    if "-e RAY_AUTH_MODE=token" not in ((config.get("docker") or {}).get("run_options") or []):
        raise ConfigError(f"{p}: docker.run_options lacks '-e RAY_AUTH_MODE=token' (token authentication for every "
                          "process in the container)")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in config.get(key) or []:
            if "ray start" in cmd and "RAY_AUTH_MODE=token" not in cmd:
                raise ConfigError(f"{p}: {key}: {cmd.strip()!r} starts Ray without RAY_AUTH_MODE=token")
    if not any(str(remote).endswith("/.ray/auth_token") for remote in config.get("file_mounts") or {}):
        raise ConfigError(f"{p}: file_mounts does not copy the auth token to ~/.ray/auth_token on the nodes")
    offered = {r for node in (config.get("available_node_types") or {}).values()
               if (node.get("max_workers") or 0) > 0 for r in (node.get("resources") or {})}
    if set(needed) - offered:
        raise ConfigError(f"{p}: no worker node type offers the custom resources {sorted(set(needed) - offered)} that the "
                          "federated sites ask for")
    return [image for _, image in images]


def check_repo(root: str | Path = ".") -> list[str]:
    """Check every cluster file under ``root`` (see the module docstring); one line per file checked."""
    exp = expectations(root)
    kuberay_dir, launcher_dir = exp.root / "cluster" / "kuberay", exp.root / "cluster" / "launcher"
    paths = sorted(kuberay_dir.glob("*.yaml"))
    if not paths:
        raise ConfigError(f"{kuberay_dir}: no manifests")
    manifests = [(p, load_manifest(p)) for p in paths]
    needed = set().union(*(check_manifest(m, p, exp) for p, m in manifests))
    # The standing RayCluster serves any job, the federated ones included.
    for p, m in manifests:
        if isinstance(m, RayCluster):
            check_resources(m.spec, needed, f"{p} (RayCluster {m.metadata.name})")
    images = {c.image for _, m in manifests for _, _, pod in m.cluster.groups() for c in pod.containers}
    images |= {c.image for _, m in manifests if isinstance(m, RayJob) and m.spec.submitterPodTemplate
               for c in m.spec.submitterPodTemplate.spec.containers}
    launchers = sorted(launcher_dir.glob("*.yaml"))
    for p in launchers:
        images |= set(check_launcher(p, exp, needed))
    if len(images) != 1:
        raise ConfigError(f"the cluster files name {len(images)} images, {sorted(images)}: use one image everywhere, "
                          "so every node runs the same Ray, Python and ray_med")
    lines = [f"ok  {p.relative_to(exp.root).as_posix()}: {m.kind} {m.metadata.name}" for p, m in manifests]
    lines += [f"ok  {p.relative_to(exp.root).as_posix()}: launcher config" for p in launchers]
    lines.append(f"{len(manifests)} KubeRay manifests and {len(launchers)} launcher configs agree: Ray "
                 f"{exp.ray_version}, Python {exp.python}, image {images.pop()}, token authentication on")
    return lines


# --- the command line -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ray_med.cluster.kuberay",
        description="Check the cluster files offline, or render RayService serveConfigV2 from cluster/serve.")
    parser.add_argument("command", choices=["check", "render-service"])
    parser.add_argument("--root", default=".", help="the repository root (default: the current directory)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            for line in check_repo(args.root):
                print(line)
        else:
            exp = expectations(args.root)
            services = [p for p in sorted((exp.root / "cluster" / "kuberay").glob("*.yaml"))
                        if (_yaml_or_config_error(p.read_text(encoding="utf-8"), p) or {}).get("kind") == "RayService"]
            for p in services:
                changed = render_service(p, exp.root)
                print(f"{'rendered' if changed else 'up to date'}  {p.relative_to(exp.root).as_posix()}")
    except ConfigError as exc:
        print(f"kuberay {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
