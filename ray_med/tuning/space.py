"""Search spaces as data: dotted config keys -> distributions, checked before any trial starts (no Ray).

A space is written in the sweep's YAML, keyed by the paths ``key=value`` overrides use::

    space:
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      adapter.r: {choice: [4, 8, 16, 32]}

Nested keys (``train: {lr: {loguniform: ...}}``) mean the same, so a command-line
override ``space.train.lr={loguniform: [...]}`` replaces one entry. :func:`parse_space`
checks each distribution's shape (an empty choice list or a bound where low > high fails
here), and :func:`check_space` checks every path and value against the config class by
loading the base config with it, so a typo fails before any trial with the valid keys.
A trial's config is the base config plus its sampled values as overrides
(:func:`trial_config`), loaded just as strictly.

Choice values that are not plain scalars (a list of target modules) travel through the
searcher as their YAML text, since Optuna's categorical distributions hold scalars only;
:meth:`Param.decode` turns them back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ray_med.config import apply_overrides, format_override, from_dict, read_yaml
from ray_med.errors import ConfigError

KINDS = ("choice", "uniform", "loguniform", "randint")
FIXED = ("data", "model", "run", "stage", "output_dir", "tokenizer", "corpus", "train.max_length")
"""Keys a sweep cannot vary: the data is read, split and tokenized once for every trial, and the run
settings are the sweep's."""


def _plain(value: Any) -> Any:
    """A sampled value as a plain Python value (searchers hand back numpy scalars)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


@dataclass(frozen=True)
class Param:
    """One swept key and its distribution."""

    path: str
    kind: str
    values: tuple[Any, ...] = ()
    """choice: the values."""
    low: float = 0.0
    high: float = 0.0

    @property
    def encoded(self) -> bool:
        """A choice with a non-scalar value: the searcher sees each value's YAML text."""
        return self.kind == "choice" and not all(_scalar(v) for v in self.values)

    def search_values(self) -> list[Any]:
        """The choice values as the searcher holds them."""
        return [_yaml_text(v) for v in self.values] if self.encoded else list(self.values)

    def decode(self, value: Any) -> Any:
        """A value from the searcher back to the config value."""
        value = _plain(value)
        return yaml.safe_load(value) if self.encoded else value

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice of {len(self.values)}"
        return f"{self.kind} [{self.low:g}, {self.high:g}]"

    def representatives(self) -> list[Any]:
        """Values that stand for the whole range when checking the path and type."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def _flatten(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in space.items():
        path = f"{prefix}{key}"
        if isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in KINDS:
            out[path] = spec
        elif isinstance(spec, Mapping) and spec:
            out.update(_flatten(spec, f"{path}."))
        else:
            raise ConfigError(f"space.{path}: expected one of {{{', '.join(f'{k}: ...' for k in KINDS)}}}, "
                              f"got {spec!r}")
    return out


def _bounds(path: str, kind: str, args: Any) -> tuple[float, float]:
    if not (isinstance(args, Sequence) and not isinstance(args, str) and len(args) == 2
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"space.{path}: {kind} takes [low, high] (two numbers), got {args!r}")
    low, high = float(args[0]), float(args[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"space.{path}: {kind} bounds must be finite, got [{low:g}, {high:g}]")
    if low > high:
        raise ConfigError(f"space.{path}: {kind} has low > high ({low:g} > {high:g})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space.{path}: loguniform needs low > 0, got {low:g}")
    if kind == "randint" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"space.{path}: randint takes integer bounds, got [{low:g}, {high:g}]")
    return low, high


def parse_space(space: Mapping[str, Any]) -> dict[str, Param]:
    """The space's parameters by dotted key, each distribution's shape checked (not yet its path)."""
    if not space:
        raise ConfigError("space is empty: name at least one key to sweep, e.g. train.lr: {loguniform: [1e-4, 3e-3]}")
    params: dict[str, Param] = {}
    for path, spec in _flatten(space).items():
        ((kind, args),) = spec.items()
        fixed = next((f for f in FIXED if path == f or path.startswith(f"{f}.")), None)
        if fixed is not None:
            raise ConfigError(f"space.{path}: '{fixed}' cannot be swept (the data is split and tokenized once for "
                              "every trial, and the run settings are the sweep's); set it in the base config")
        if kind == "choice":
            if not isinstance(args, Sequence) or isinstance(args, str):
                raise ConfigError(f"space.{path}: choice takes a list of values, got {args!r}")
            if not args:
                raise ConfigError(f"space.{path}: the choice list is empty")
            params[path] = Param(path, kind, values=tuple(args))
        else:
            low, high = _bounds(path, kind, args)
            params[path] = Param(path, kind, low=low, high=high)
    return params


def trial_overrides(params: Mapping[str, Param], sampled: Mapping[str, Any], *, decoded: bool = False) -> list[str]:
    """A trial's sampled values as ``key=value`` overrides, in the space's order.

    ``sampled`` holds the searcher's values (decoded here), or config values with ``decoded``.
    """
    missing = [p for p in params if p not in sampled]
    if missing:
        raise ConfigError(f"the trial has no value for {', '.join(missing)}")
    return [format_override(path, _plain(sampled[path]) if decoded else p.decode(sampled[path]))
            for path, p in params.items()]


def base_data(cls: type, base: str | Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The base config as data (its YAML with ``overrides`` applied, paths checked): what trials start from."""
    return apply_overrides(cls, read_yaml(base) if base is not None else {}, overrides)


def trial_config(cls: type, base: Mapping[str, Any], params: Mapping[str, Param], sampled: Mapping[str, Any], *,
                 decoded: bool = False) -> Any:
    """The trial's config: the base config data plus the sampled values, loaded strictly."""
    return from_dict(cls, apply_overrides(cls, dict(base), trial_overrides(params, sampled, decoded=decoded)),
                     where="the trial's config")


def check_space(cls: type, base: Mapping[str, Any], params: Mapping[str, Param]) -> None:
    """Every path exists in ``cls`` and every representative value loads (one line, before any trial)."""
    for path, p in params.items():
        for value in p.representatives():
            try:
                from_dict(cls, apply_overrides(cls, dict(base), [format_override(path, value)]), where="the base config")
            except ConfigError as exc:
                raise ConfigError(f"space.{path}: {exc}") from None


def grid_size(params: Mapping[str, Param]) -> int:
    """How many trials one pass over a grid of choice lists makes."""
    n = 1
    for p in params.values():
        if p.kind != "choice":
            raise ConfigError(f"space.{p.path}: the grid searcher takes choice lists only, got {p.kind}")
        n *= len(p.values)
    return n
