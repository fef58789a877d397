"""The config of ``jobs/federated.py``: modalities, clients, partition, rounds, strategy, privacy, the actor pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_med.runtime import RuntimeConfig


@dataclass
class ModalityConfig:
    """One modality: its encoder, the task its heads learn, and the file the clients read."""

    task: str = "pneumonia"
    """A registered task whose inputs are this modality's (pneumonia, breast_cancer, mtsamples_specialty, heartbeat)."""
    path: str = "pneumoniamnist/pneumoniamnist_trainval.npz"
    """The task's file, relative to data_root unless absolute, ``./``-relative (the working directory) or pkg://."""
    split: str | None = "train"
    """For a file with splits (MedMNIST): the one the federation splits 7:1:1:1 (the others stay held out)."""
    encoder: str = "cnn"
    """image: cnn | siglip; tabular: mlp; text: tiny-bert | minilm; signal: conv1d."""
    dim: int = 64
    """Encoder output size."""
    tower: str = "tiny-siglip"
    """Image siglip: the vision tower preset (the multimodal model's)."""
    image_size: int = 28
    train_encoder: bool = True
    """Text minilm: fine-tune it (false: frozen; only the heads train and travel)."""
    max_length: int = 128
    on_error: str = "raise"
    """A malformed record: raise (the run stops with its line) or skip (counted, left out)."""


@dataclass
class SiteConfig:
    """A named hospital: the modalities it holds and, on a cluster, where it runs."""

    name: str = "hospital_a"
    modalities: list[str] = field(default_factory=lambda: ["image"])
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources that pin this client's work to its node, e.g. {hospital_a: 1}."""


@dataclass
class ClientsConfig:
    """Who takes part: ``count`` virtual clients holding every modality, or named ``sites``."""

    count: int = 5
    """Virtual clients client_0000..; ignored when sites are given."""
    sites: list[SiteConfig] = field(default_factory=list)
    """By-site federation: each site holds its own modalities (the data of a modality is split among its sites)."""
    fraction: float = 1.0
    """Share of the clients sampled each round."""
    min_per_round: int = 1
    """At least this many are sampled, and a round needs this many results (else it is redone, then fails)."""


@dataclass
class PartitionConfig:
    """How each modality's data is split: 7:1:1:1 (FedKIM), then the private split among clients."""

    scheme: str = "dirichlet"
    """iid | dirichlet (label skew) | quantity (size skew)."""
    alpha: float = 0.5
    ratios: list[float] = field(default_factory=lambda: [7.0, 1.0, 1.0, 1.0])
    """private, public (the injection server's), dev, test."""


@dataclass
class LocalConfig:
    """Each client's local training per round."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    """sgd (with momentum) | adamw; either starts afresh every round."""
    momentum: float = 0.9


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    """fedavg | fedprox | fedadam."""
    mu: float = 0.0
    """FedProx's proximal weight (fedprox needs > 0)."""
    server_lr: float | None = None
    """Server step size (null: 1 for fedavg/fedprox, 0.01 for fedadam)."""
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass
class DPConfig:
    """Client-level DP (DP-FedAvg): clip each client's update, noise the sum, account ε."""

    enabled: bool = False
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    max_epsilon: float | None = None
    """Stop before the round that would spend more than this."""


@dataclass
class SecAggConfig:
    enabled: bool = False
    """Pairwise-masked updates: the server sees only their sum."""


@dataclass
class PoolConfig:
    """The actors that run the virtual clients."""

    actors: int = 2
    """Executor actors (each runs one client at a time)."""
    num_cpus: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources of the shared pool's executors, e.g. {federated_pool: 1}: keeps them
    (and the server's public, dev and test rows they score) off the hospitals' nodes."""
    max_restarts: int = 3
    """A dead actor is restarted this many times (its client of that round is dropped)."""
    deadline_s: float = 300.0
    """A round waits at most this long; clients still running are dropped from it."""
    start_wait_s: float = 600.0
    """How long the executors' first start is waited for (on an autoscaling cluster: a node's
    boot and image pull); a pool executor not up by then fails the job."""
    site_wait_s: float = 30.0
    """After the first round's start, a pinned site's executor that does not answer within
    this at a round's start (its node is gone) is left out of that round, and re-admitted
    when it answers again."""


@dataclass
class FederatedConfig:
    """jobs/federated.py: clients as Ray actors, strategies, DP, secure aggregation, round checkpoints."""

    modalities: dict[str, ModalityConfig] = field(default_factory=lambda: {"image": ModalityConfig()})
    """Modality name (image, tabular, text, signal) -> its encoder, task and file."""
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    rounds: int = 10
    local: LocalConfig = field(default_factory=LocalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    data_root: str = "../shared/data"
    bootstrap: int = 1000
    """Bootstrap resamples for the AUROC CIs of the final test scores."""
    output_dir: str | None = None
    """Where global/, rounds.json and plots/ go (default: the run folder)."""
    run: RuntimeConfig = field(default_factory=RuntimeConfig)
    fail_client: str | None = None
    """Test hook: this client's data is treated as malformed (its rounds fail, the federation goes on)."""
    crash_client: str | None = None
    """Test hook, ``<client>@<round>``: the executor running that client in that round exits (a killed actor)."""
    hold_after_round: int | None = None
    """Test hook: after this round's checkpoint the driver prints a line and waits (for a test to kill it)."""


@dataclass
class FederatedOutputs:
    run_dir: str
    global_dir: str
    rounds: list[dict[str, Any]]
    test: dict[str, dict[str, Any]]
    """Per modality: the final global model's metrics on the federation's test split."""

    def headline(self) -> tuple[str, Any]:
        """The first modality's test macro AUROC (what the run index lists)."""
        for mod, m in self.test.items():
            return f"{mod}_test_auroc", m.get("auroc_macro")
        return "rounds", len(self.rounds)


@dataclass
class FederatedEvalConfig:
    """A global modality model (``<output_dir>/global/<modality>``) on one task's file."""

    model: str
    """The federated run's global folder (or one modality's folder inside it)."""
    data: str
    format: str
    """Its reader: medmnist, breast_cancer_csv, mtsamples, pubmedqa, mitbih_csv."""
    task: str
    modality: str | None = None
    """The modality folder under ``model`` (default: the task's modality)."""
    split: str | None = None
    """For a MedMNIST .npz with several splits: the one to score (a file with one split is read whole)."""
    bootstrap: int = 1000
    seed: int = 0
