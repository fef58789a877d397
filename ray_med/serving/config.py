"""The Serve app's config: what it serves (a model folder, adapters, classifiers) and how.

``build_app(args)`` reads the ``args`` of a Serve config YAML into :class:`ServeAppConfig`
with the same strict loader as every job config, so a misspelt key fails ``serve run``
with the valid keys listed. Paths are checked on the driver before any replica starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ray_med.adapters.registry import check_adapter_dir
from ray_med.errors import ConfigError, ModelError
from ray_med.evaluation.config import QAConfig
from ray_med.runtime import RuntimeConfig, Storage, cache_root, is_uri, localize
from ray_med.tasks.registry import prompt_formats


@dataclass
class DeploymentConfig:
    """Replicas, capacity and batching of one deployment."""

    min_replicas: int = 1
    """Autoscaling lower bound."""
    max_replicas: int = 1
    """Autoscaling upper bound; autoscaling is on when it exceeds min_replicas."""
    target_ongoing_requests: float = 16.0
    """Autoscaling target of in-flight requests per replica."""
    max_ongoing_requests: int = 64
    """Requests a replica takes at once; must be >= max_batch_size x max_concurrent_batches."""
    max_queued_requests: int = 256
    """Requests waiting for a replica before new ones get HTTP 503 (backpressure, not OOM)."""
    max_replicas_per_node: int = 0
    """At most this many replicas on one node (0: no limit). 1 spreads the replicas over
    nodes, so losing a node leaves the others serving while Serve replaces its replicas."""
    num_cpus: float = 1.0
    """CPUs reserved per replica."""
    num_gpus: float = 0.0
    """GPUs per replica (fractions share a GPU)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources per replica: which nodes may host it (e.g. {serve: 1} for a serving
    node pool, or {"accelerator_type:L4": 0.001} for one GPU type)."""
    torch_threads: int = 0
    """Intra-op threads for the model (0: num_cpus, rounded up)."""
    user_code_thread: bool = False
    """Serve's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD for this replica. Off here: our
    handlers never block (models run on their own compute thread), so the extra thread
    crossing per request buys nothing. (On 2 cores its effect was within run-to-run noise.)"""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables of the replica processes (e.g. HF_HOME, GOMP_SPINCOUNT)."""
    max_batch_size: int = 32
    """Largest dynamic batch (@serve.batch)."""
    max_concurrent_batches: int = 2
    """Batches in flight per replica. They still run one at a time on the compute thread,
    but the next batch forms while the previous one runs, so the model never idles
    while results travel back and new requests arrive."""
    batch_wait_timeout_s: float = 0.0
    """How long a batch waits to fill. 0 takes whatever is queued: under load requests
    pile up while the previous batch runs, so batches fill anyway, and a lone request
    pays no wait."""
    max_adapters: int = 8
    """Adapters a replica keeps loaded (LRU; @serve.multiplexed)."""


@dataclass
class AuthConfig:
    """The gateway's API key: clients send ``Authorization: Bearer <key>`` (as OpenAI clients do).

    Set at most one source. The key is read by each gateway replica at start-up, never
    written into the config; with neither set, the API is open (bind it to 127.0.0.1).
    """

    api_key_env: str = ""
    """Name of an environment variable of the gateway replicas holding the key (e.g. RAY_MED_API_KEY)."""
    api_key_file: str = ""
    """A file holding the key (surrounding whitespace ignored), e.g. a mounted Kubernetes secret."""

    @property
    def enabled(self) -> bool:
        return bool(self.api_key_env or self.api_key_file)


ENGINES = ("hf", "vllm")
"""The generation engines of ``engine``."""
VLLM_LORA_SCHEMES = ("s3", "gs", "abfss")
"""Where ``vllm.lora_dir`` may live: the schemes both Ray Serve LLM's LoRA loader and ray_med's storage read."""


@dataclass
class VLLMConfig:
    """vLLM of ``engine: vllm``: Ray Serve LLM's LLMServer on GPUs (``pip install .[vllm]``); unused with ``hf``.

    The LLMServer replicas take their replica counts, capacity, CPUs, custom resources and env
    from the ``lm`` section. Their GPUs are ``tensor_parallel_size`` each (``lm.num_gpus`` is
    unused), and vLLM batches continuously (the batch and thread settings are unused).
    """

    lora_dir: str = ""
    """Remote folder (s3://, gs:// or abfss://) holding one PEFT LoRA folder per adapter, named by its served name:
    each adapters entry must be <lora_dir>/<name>. Required with adapters: Ray Serve LLM loads LoRA adapters only
    from remote storage, as <lora_dir>/<name> for the model id <base>:<name>."""
    max_model_len: int = 0
    """Context length (prompt + generated tokens) vLLM allocates for; 0: the model's."""
    dtype: str = "auto"
    """Weights and activations dtype: auto (the model's), bfloat16 or float16."""
    tensor_parallel_size: int = 1
    """GPUs per replica, each holding a shard of every layer."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM takes (weights, then KV cache)."""
    max_lora_rank: int = 16
    """Largest LoRA rank (r) among the adapters: vLLM sizes its LoRA buffers for it."""
    max_loras: int = 0
    """Adapters in one GPU batch; 0: all of them, at most lm.max_adapters."""
    accelerator_type: str = ""
    """The GPU type the replicas need, in Ray's names (e.g. L4, A10G, A100, H100); empty: any GPU."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further vLLM engine arguments, passed as they are (e.g. enable_prefix_caching: true, max_num_seqs: 64)."""


def _gateway() -> DeploymentConfig:
    return DeploymentConfig(max_ongoing_requests=512, max_queued_requests=1024, num_cpus=0.5,
                            target_ongoing_requests=128.0)


def _lm() -> DeploymentConfig:
    # 32 sequences decode together; top-token QA batches are as large, two in flight.
    return DeploymentConfig(max_batch_size=32, max_ongoing_requests=64, max_queued_requests=128)


@dataclass
class ServeAppConfig:
    """The ray_med Serve application (``import_path: ray_med.serving.app:build_app``)."""

    model: str = ""
    """Model folder (HF format, with its tokenizer); empty: none. A causal LM serves /v1/qa, /v1/generate
    and chat; a multimodal (LLaVA) one, e.g. jobs/multimodal.py's <output_dir>/model, serves /v1/generate
    and chat with an image, and /v1/classify with image + task; an injected model (jobs/inject.py's
    <output_dir>/model) serves /v1/classify and /v1/generate with task (+ modality) and an image, features
    or text."""
    model_name: str = ""
    """Name of the base model in /v1/models and chat requests (default: the folder's name)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters of the causal LM by name (PEFT folders, e.g. <finetune output_dir>/adapter)."""
    adapter: str = ""
    """An injected model's adapter (jobs/inject.py's <output_dir>/adapter: M3OE or LoRA; empty for FedPlug)."""
    gate: str = "live"
    """An injected M3OE model: live (the gate computed per request from its task and modality texts: unseen
    tasks too) or folded (each known task's folded LoRA, from folded_dir, in the multiplexed adapter cache)."""
    folded_dir: str = ""
    """With gate folded: jobs/inject.py's <output_dir>/folded (one PEFT LoRA folder per task)."""
    classifiers: dict[str, str] = field(default_factory=dict)
    """Stage-2 classifiers by name (folders written by jobs/finetune.py stage=downstream)."""
    qa: QAConfig = field(default_factory=QAConfig)
    """Default QA settings; a request may change mode, n, temperature and seed. qa.seed picks
    the exemplars of an unseeded request; its sampling draws a random seed."""
    shots_file: str = ""
    """File of few-shot exemplars for /v1/qa (used when qa.shots > 0)."""
    shots_format: str = ""
    """Reader of shots_file: medqa, medmcqa or pubmedqa."""
    max_input_chars: int = 20000
    """Longest text field accepted (HTTP 413 beyond it; at most 100000)."""
    max_image_bytes: int = 20_000_000
    """Largest image file (PNG/JPEG bytes, before base64) accepted (HTTP 413 beyond it); a chest X-ray
    PNG is typically 1-10 MB."""
    max_image_pixels: int = 25_000_000
    """Largest image (width x height, read from its header before decoding) accepted (HTTP 413 beyond it)."""
    max_new_tokens: int = 512
    """Most tokens one request may generate."""
    stream_interval_s: float = 0.05
    """A streamed generation sends what it has decoded at most this often (its first text at once). Each
    chunk crosses two Ray hops and the proxy; one per token costs more CPU than decoding it under load
    (measured: bench/generate_load.py). 0: a chunk per decode step."""
    classify_in_gateway: bool = True
    """Run the classifiers inside the gateway replicas, saving a hop per request (right for
    encoder-sized models). false: a separate ClassifierServer deployment that scales on its own."""
    classify_max_length: int = 256
    """Tokens per classified example (longer input is truncated, as in training)."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """An API key every endpoint but /healthz requires (default: none)."""
    docs: bool = False
    """Serve FastAPI's /docs page (Swagger UI). Off by default: the page loads its scripts
    from a public CDN, so it is blank on an air-gapped network; /openapi.json is always served."""
    access_log: bool = False
    """Log a line per request in every deployment (Serve's access log)."""
    log_level: str = "INFO"
    """Log level of the deployments."""
    gateway: DeploymentConfig = field(default_factory=_gateway)
    """The HTTP ingress (FastAPI): replicas, capacity, CPUs, env. Its batch, thread and
    adapter settings are unused: in-gateway classifiers take the classifier section's."""
    lm: DeploymentConfig = field(default_factory=_lm)
    """The causal LM deployment."""
    classifier: DeploymentConfig = field(default_factory=DeploymentConfig)
    """The classifiers: their batching, threads and adapter LRU (wherever they run); their
    replicas and capacity when classify_in_gateway is false."""
    engine: Literal["hf", "vllm"] = "hf"
    """What generates text: hf (transformers in the LMServer replicas, CPU or GPU) or vllm (Ray Serve LLM's
    vLLM LLMServer on GPUs, behind the same gateway and schemas: a text causal LM and its LoRA adapters only;
    /v1/qa stays on hf)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM's settings, with engine vllm."""

    def check(self) -> None:
        """Every path exists and is the kind of folder its key says; names are unique."""
        # lazy: the classifier folder module loads torch; this config parses without it
        from ray_med.adapters.classifier import check_classifier_dir

        # lazy: the schemas load pydantic, which parsing this config does not need
        from ray_med.serving.schemas import MAX_CHARS

        if not self.model and not self.classifiers:
            raise ConfigError("nothing to serve: set model (a causal LM folder) and/or classifiers")
        if self.model and not any((Path(self.model) / f).is_file() for f in ("config.json", "injected_config.json")):
            raise ConfigError(f"model: {self.model} is not a model folder (no config.json, nor the "
                              "injected_config.json of jobs/inject.py's model)")
        if self.adapters and not self.model:
            raise ConfigError("adapters are LoRA adapters of the causal LM: set model too")
        self._check_injected()
        if self.adapters and self.model_multimodal():
            raise ConfigError("adapters: LoRA adapters are served for a causal LM; model is a multimodal (LLaVA) "
                              "folder (merge its LoRA into it, as jobs/multimodal.py's export does)")
        both = set(self.adapters) & set(self.classifiers)
        if both:
            raise ConfigError(f"names used both as adapter and classifier: {sorted(both)}")
        try:
            for name, path in self.adapters.items():
                check_adapter_dir(path)
                _check_name(name)
            for name, path in self.classifiers.items():
                check_classifier_dir(path)
                _check_name(name)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        if not 1 <= self.max_input_chars <= MAX_CHARS:
            raise ConfigError(f"max_input_chars must be between 1 and {MAX_CHARS}, got {self.max_input_chars}")
        if self.max_image_bytes < 1:
            raise ConfigError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.auth.api_key_env and self.auth.api_key_file:
            raise ConfigError("auth: set api_key_env or api_key_file, not both")
        if self.auth.api_key_file and not Path(self.auth.api_key_file).is_file():
            raise ConfigError(f"auth.api_key_file: {self.auth.api_key_file} does not exist")
        if self.qa.shots > 0:
            formats = prompt_formats()
            if not self.shots_file or not Path(self.shots_file).is_file():
                raise ConfigError(f"qa.shots > 0 needs shots_file, an existing file (got {self.shots_file!r})")
            if self.shots_format not in formats:
                raise ConfigError(f"shots_format must be one of {', '.join(formats)}, got {self.shots_format!r}")
        # In-gateway classifiers are batched in the gateway replicas with the classifier
        # section's batch settings, so the gateway's capacity must hold those batches.
        checks = [("lm", self.lm, self.lm), ("classifier", self.classifier, self.classifier)]
        if self.classify_in_gateway:
            checks.append(("gateway", self.gateway, self.classifier))
        for name, capacity, batching in checks:
            need = batching.max_batch_size * batching.max_concurrent_batches
            if capacity.max_ongoing_requests < need:
                raise ConfigError(f"{name}.max_ongoing_requests ({capacity.max_ongoing_requests}) < max_batch_size "
                                  f"x max_concurrent_batches ({need}): batches could never fill")
        self._check_engine()

    def localized(self, *, lm: bool = True, classifiers: bool = True) -> ServeAppConfig:
        """This config with the folders in remote storage (``s3://...``) replaced by local copies.

        ``runtime.localize`` downloads each once per machine, into ``~/.cache/ray_med``
        (``$RAY_MED_CACHE``); a classifier's recorded base model and stage-1 adapter come
        along. ``lm`` covers the language model, its adapters and the shots file,
        ``classifiers`` the classifiers: a replica asks only for what it loads (a gateway
        running classifiers never downloads the LM). The driver calls it with both to
        check the folders.
        """
        # lazy: the classifier folder module loads torch; this config parses without it
        from ray_med.adapters.classifier import localize_classifier

        out = self
        if lm:
            out = replace(
                out, model=localize(self.model) if self.model else self.model,
                adapter=localize(self.adapter, what="adapter folder") if self.adapter else self.adapter,
                adapters={n: localize(p, what="adapter folder") for n, p in self.adapters.items()},
                shots_file=localize(self.shots_file, what="shots file") if self.shots_file else self.shots_file,
            )
        if classifiers:
            out = replace(out, classifiers={n: localize_classifier(p, localize, cache_root())
                                            for n, p in self.classifiers.items()})
        return out

    def _check_injected(self) -> None:
        if self.gate not in ("live", "folded"):
            raise ConfigError(f"gate must be live or folded, got {self.gate!r}")
        if not self.model_injected():
            if self.adapter or self.folded_dir:
                raise ConfigError("adapter and folded_dir belong to an injected model (jobs/inject.py's "
                                  "<output_dir>/model); LoRA adapters of a causal LM go in adapters")
            return
        if self.adapters:
            raise ConfigError("adapters: an injected model takes its adapter in adapter (and folded_dir), not "
                              "adapters")
        if self.adapter:
            try:
                check_adapter_dir(self.adapter)
            except ModelError as exc:
                raise ConfigError(f"adapter: {exc}") from None
        if self.gate == "folded" and not Path(self.folded_dir).is_dir():
            raise ConfigError(f"gate folded needs folded_dir, jobs/inject.py's <output_dir>/folded (got "
                              f"{self.folded_dir!r})")

    def _check_engine(self) -> None:
        if self.engine not in ENGINES:  # the loader refuses it first; this guards a config built in code
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine != "vllm":
            return
        what = "engine vllm serves a text causal LM"
        if not self.model:
            raise ConfigError(f"{what}: set model (classifiers alone need no engine; leave engine hf)")
        if self.model_injected():
            raise ConfigError(f"{what}; model is an injected model (jobs/inject.py): use engine hf")
        if self.model_multimodal():
            raise ConfigError(f"{what}; model is a multimodal (LLaVA) folder: use engine hf")
        if ":" in self.base_name:  # Ray Serve LLM's model ids are <base>:<adapter>
            raise ConfigError(f"model_name {self.base_name!r}: engine vllm needs a name without ':'")
        v = self.vllm
        for key, ok in (("tensor_parallel_size", v.tensor_parallel_size >= 1), ("max_model_len", v.max_model_len >= 0),
                        ("gpu_memory_utilization", 0 < v.gpu_memory_utilization <= 1),
                        ("max_lora_rank", v.max_lora_rank >= 1), ("max_loras", v.max_loras >= 0)):
            if not ok:
                raise ConfigError(f"vllm.{key} is out of range: {getattr(v, key)!r}")
        # Keys this config sets itself: one place each. model and served_model_name are Ray's (it refuses them).
        owned = {f for f in VLLMConfig.__dataclass_fields__ if f not in ("lora_dir", "accelerator_type",
                                                                           "engine_kwargs")}
        owned |= {"enable_lora", "model", "served_model_name"}
        clash = sorted(owned & set(v.engine_kwargs))
        if clash:
            raise ConfigError(f"vllm.engine_kwargs: {clash} are set by vllm.<key> (or model/model_name), not here")
        if not self.adapters:
            return
        scheme = v.lora_dir.split("://", 1)[0] if "://" in v.lora_dir else ""
        if scheme not in VLLM_LORA_SCHEMES:
            raise ConfigError(f"adapters with engine vllm need vllm.lora_dir, a remote folder ("
                              f"{', '.join(s + '://' for s in VLLM_LORA_SCHEMES)}) with one adapter folder per "
                              f"name: Ray Serve LLM loads LoRA adapters only from remote storage (got {v.lora_dir!r})")
        for name, path in self.adapters.items():
            # A localized config (check() on the driver's copy) has local paths; their last part is still the name.
            wrong_uri = is_uri(path) and path.rstrip("/") != lora_path(self, name)
            if path.rstrip("/").rsplit("/", 1)[-1] != name or wrong_uri:
                raise ConfigError(f"adapters.{name}: with engine vllm it must be {lora_path(self, name)} "
                                  f"(vllm.lora_dir/<name>), got {path}")
            if is_uri(path):
                continue
            rank = _lora_rank(path)
            if rank > v.max_lora_rank:
                raise ConfigError(f"adapters.{name}: LoRA rank {rank} exceeds vllm.max_lora_rank ({v.max_lora_rank})")

    def model_injected(self) -> bool:
        """Whether ``model`` is an injected model folder (jobs/inject.py), from its injected_config.json alone."""
        if not self.model:
            return False
        if not is_uri(self.model):
            return (Path(self.model) / "injected_config.json").is_file()
        return Storage.parse(self.model).complete() and "injected_config.json" in Storage.parse(self.model).list_dir()

    def injected_tasks(self) -> dict[str, Any]:
        """An injected model's tasks (name -> modality, description, answer words, seen), from its config file."""
        text = (Path(self.model) / "injected_config.json").read_text() if not is_uri(self.model) else \
            Storage.parse(self.model).read_text("injected_config.json")
        return json.loads(text)["tasks"]

    def model_multimodal(self) -> bool:
        """Whether ``model`` is a multimodal (LLaVA) folder, read from its config.json alone.

        The gateway asks at start-up, without loading or downloading the model: a folder
        in remote storage has that one file read.
        """
        if not self.model:
            return False
        if not is_uri(self.model):
            # lazy: ray_med.models.vlm's module pulls in the presets, which this config parses without
            from ray_med.models.vlm import is_vlm_folder

            return is_vlm_folder(self.model)
        try:
            return json.loads(Storage.parse(self.model).read_text("config.json")).get("model_type") == "llava"
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model: cannot read {self.model}/config.json ({exc})") from None

    @property
    def base_name(self) -> str:
        return self.model_name or (Path(self.model).name if self.model else "")


def lora_path(cfg: ServeAppConfig, name: str) -> str:
    """Where engine vllm loads adapter ``name`` from: ``<vllm.lora_dir>/<name>``."""
    return f"{cfg.vllm.lora_dir.rstrip('/')}/{name}"


def _lora_rank(folder: str) -> int:
    """The largest LoRA rank of an adapter folder (``r``, or a larger one in ``rank_pattern``)."""
    try:
        peft = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder}: cannot read adapter_config.json ({exc})") from None
    if str(peft.get("peft_type", "")).upper() != "LORA":
        raise ConfigError(f"{folder}: engine vllm serves LoRA adapters; this one is {peft.get('peft_type')!r}")
    return max([int(peft.get("r") or 0), *(int(r) for r in (peft.get("rank_pattern") or {}).values())])


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"adapter name {name!r}: use letters, digits, '-', '_' and '.' only")


@dataclass
class ServeCheckConfig:
    """Deploy a Serve config in process, ask every endpoint once, print the answers (the demo's serve stage)."""

    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Run name, storage, seed, logging and Ray connection."""
    serve_config: str = "cluster/serve/tiny.yaml"
    """A Serve config file; its first application is deployed."""
    args: dict[str, Any] = field(default_factory=dict)
    """Args of that application to replace (e.g. args.model=runs/pretrain-xxxx/model)."""
    port: int = 0
    """HTTP port while it runs (0: a free one)."""
    data_root: str = "../shared/data"
    """Folder a relative data_path is resolved against."""
    data_path: str = "pubmedqa/pqal_trainval.json"
    """A PubMedQA file: its first item is asked in every QA mode and classified."""
    write_config: str | None = None
    """Also write the filled-in Serve config here (for `serve run`); default: <run.storage>/serve_<name>.yaml
    for serve_config <name>.yaml (runs/serve_tiny.yaml, runs/serve_tiny_vlm.yaml)."""
    image_path: str = "pneumoniamnist/pneumoniamnist_trainval.npz"
    """For a multimodal model: a MedMNIST .npz (resolved against data_root like data_path) holding the
    chest X-ray sent to /v1/generate, chat and /v1/classify instead of the PubMedQA requests."""
    image_split: str = "val"
    """The split of image_path the X-ray comes from."""
    image_index: int = 0
    """The X-ray's index in that split."""
    image_task: str = "pneumonia"
    """The multimodal image-classification task: its instruction is the generate and chat prompt, and
    /v1/classify is asked it (a task of ray_med.tasks.multimodal_tasks() with an image and choices)."""


@dataclass
class ServeCheckOutputs:
    """What the check saw: one row per request (endpoint, request, status, response)."""

    run_dir: str
    url: str
    item: dict[str, Any] = field(default_factory=dict)
    """The item asked: its id, question and gold answer (PubMedQA; for a multimodal model, the X-ray's
    id, the task's question, its gold label, and the task)."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    serve_config: str | None = None
    """The filled-in Serve config written for `serve run`."""
    multimodal: bool = False
    """The served model was multimodal: the rows are the X-ray requests, not the PubMedQA ones."""

    def headline(self) -> tuple[str, Any]:
        return "ok_requests", sum(r["status"] == 200 for r in self.rows)
