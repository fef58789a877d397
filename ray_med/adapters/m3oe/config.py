"""The M3OE adapter's own config (:class:`M3OEConfig`): experts, rank, gate, and its ``adapter_config.json`` form.

Plain data, no torch: a job config parses without loading it. A job's adapter section is
the flat :class:`~ray_med.adapters.config.AdapterConfig`;
:meth:`M3OEConfig.from_adapter_config` reads the fields M3OE uses from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, get_args

from ray_med.errors import ConfigError

if TYPE_CHECKING:
    from ray_med.adapters.config import AdapterConfig

PEFT_TYPE = "M3OE"
GateInputs = Literal["both", "task_only", "modality_only"]
GATE_INPUTS: tuple[str, ...] = get_args(GateInputs)


@dataclass
class M3OEConfig:
    """E LoRA experts in every target linear layer, mixed per sample by a gate over task and modality text."""

    experts: int = 12
    """Number of LoRA experts in each target layer (E)."""
    r: int = 8
    """Rank of each expert."""
    alpha: int = 32
    """Each expert's update is scaled by alpha / r, as in LoRA."""
    dropout: float = 0.0
    """Dropout on a layer's input before the experts' A (training only)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linear layers that get experts, by the last component of their module name."""
    top_k: int | None = None
    """Keep the k largest gate weights per sample (renormalised to sum 1); None: every expert."""
    gate_inputs: GateInputs = "both"
    """both: modality text attends to task text; task_only / modality_only: one text attends to itself."""
    gate_dim: int | None = None
    """Width of the gate's attention (W_q, W_k, W_v); None: the LLM's hidden size."""
    load_balance: float = 0.01
    """Coefficient of the load-balancing auxiliary loss (the trainer adds it)."""

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        if self.experts < 1:
            raise ConfigError(f"m3oe experts must be >= 1, got {self.experts}")
        if self.r < 1:
            raise ConfigError(f"m3oe r must be >= 1, got {self.r}")
        if self.top_k is not None and not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"m3oe top_k must be null or between 1 and experts ({self.experts}), got {self.top_k}")
        if self.gate_inputs not in GATE_INPUTS:
            raise ConfigError(f"m3oe gate_inputs must be one of {', '.join(GATE_INPUTS)}, got {self.gate_inputs!r}")
        if self.gate_dim is not None and self.gate_dim < 1:
            raise ConfigError(f"m3oe gate_dim must be null or >= 1, got {self.gate_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"m3oe dropout must be in [0, 1), got {self.dropout}")
        if self.load_balance < 0:
            raise ConfigError(f"m3oe load_balance must be >= 0, got {self.load_balance}")
        if not self.target_modules:
            raise ConfigError("m3oe target_modules must name at least one linear layer")

    @property
    def scaling(self) -> float:
        """alpha / r: the factor on every expert's B A x."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus ``"peft_type": "M3OE"`` (how :func:`~ray_med.adapters.registry.method_of_folder` knows it)."""
        return {"peft_type": PEFT_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> M3OEConfig:
        """The config in ``data`` (``to_dict``'s form); keys that are not fields (peft_type, hidden_size) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_adapter_config(cls, cfg: AdapterConfig) -> M3OEConfig:
        """The M3OE fields of a job's adapter section (``gate_dim`` stays the LLM's hidden size)."""
        return cls(experts=cfg.experts, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                   target_modules=list(cfg.target_modules), top_k=cfg.top_k, gate_inputs=cfg.gate_inputs,
                   load_balance=cfg.load_balance)
