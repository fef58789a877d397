"""Typed, strict configs: dataclass trees loaded from YAML plus ``key=value`` overrides.

Every job's config is a tree of dataclasses. :func:`load_config` reads a YAML file,
applies dotted overrides from the command line (``trainer.num_workers=2``,
``corpus.sources.0.weight=0.5``), and converts the result into the dataclass tree,
checking every key and every type on the way. An unknown key or a wrong type raises
:class:`~ray_med.errors.ConfigError` naming the key, the file, and the valid keys; a
typo never silently falls back to a default.

Fields document themselves with a string literal right under them (the attribute
docstring convention); :func:`describe` reads those for ``--help``.

The same override syntax is used by the CLI, by Tune search spaces and by Serve
builder args, so a config path means the same thing everywhere.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ray_med.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Load ``cls`` from a YAML file (optional) and ``a.b=c`` overrides, strictly."""
    where = str(path) if path is not None else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    data = apply_overrides(cls, data, overrides)
    return from_dict(cls, data, where=where)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with clear errors for a missing file or bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.0.c=value`` into its key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. trainer.num_workers=2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from None
    return key.split("."), value


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """``table[name]``, or a :class:`ConfigError` with the closest valid name and all of them.

    How every registry (jobs, tasks, adapter methods) answers a name it does not know.
    """
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown {what} '{name}'.{hint} Valid {what}s: {', '.join(table)}")


def format_override(key: str, value: Any) -> str:
    """``key=value`` with the value written so that :func:`parse_override` reads it back unchanged."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=c`` override applied.

    The key path is checked against the dataclass tree while walking it, so a typo in an
    override fails with the valid keys at that level, before anything runs.
    """
    data = json.loads(json.dumps(data, default=str)) if data else {}
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        tp: Any = cls
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            tp = _strip_optional(tp)
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                names = [f.name for f in dataclasses.fields(tp)]
                if part not in names:
                    raise ConfigError(_unknown_key_message(here, part, names, f"override {text!r}"))
                tp = _field_types(tp)[part]
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        # Absent from the file: start from an empty container of the right kind.
                        is_list = typing.get_origin(_strip_optional(tp)) in (list, Sequence, tuple)
                        node[part] = [] if is_list else {}
                    node = node[part]
            elif typing.get_origin(tp) in (list, Sequence, tuple):
                if not part.lstrip("-").isdigit() or not isinstance(node, list):
                    raise ConfigError(f"override {text!r}: '{here}' must be a list index")
                idx = int(part)
                if not -len(node) <= idx < len(node):
                    raise ConfigError(
                        f"override {text!r}: index {idx} is out of range; '{'.'.join(parts[:i])}' has "
                        f"{len(node)} entries"
                    )
                tp = typing.get_args(tp)[0]
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif typing.get_origin(tp) in (dict, Mapping) or tp is Any:
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: '{'.'.join(parts[:i])}' is not a mapping")
                args = typing.get_args(tp)
                tp = args[1] if len(args) == 2 else Any
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(parts[:i])}' is a {_type_name(tp)}, it has no key '{part}'"
                )
    return data


def from_dict(cls: type[T], data: Any, *, where: str = "config", key: str = "") -> T:
    """Convert a plain mapping into the dataclass ``cls``, checking keys and types."""
    return _convert(cls, data, key, where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain dicts and lists (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The config tree as YAML text, in field order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Any, *, exclude: Sequence[str] = ()) -> str:
    """A short stable hash of a config tree, leaving out the dotted keys in ``exclude``."""
    data = to_dict(cfg)
    for dotted in exclude:
        node = data
        *head, last = dotted.split(".")
        for part in head:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every leaf key of a config class as (dotted key, type, default, doc), for ``--help``."""
    rows: list[tuple[str, str, str, str]] = []
    docs = field_docs(cls)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix=dotted + "."))
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((dotted, _type_name(hints[f.name]), default, docs.get(f.name, "")))
    return rows


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass, keyed by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --------------------------------------------------------------------------- internals


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    # Resolving string annotations (from __future__ import annotations) needs the
    # defining module's globals; get_type_hints does that.
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _unknown_key_message(dotted: str, name: str, valid: Sequence[str], where: str) -> str:
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    level = f"under '{parent}'" if parent else "at the top level"
    return (
        f"unknown config key '{dotted}' ({where}).{hint} Valid keys {level}: {', '.join(valid)}"
    )


def _bad_type(key: str, tp: Any, value: Any, where: str) -> ConfigError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ConfigError(
        f"config key '{key or '<root>'}' expects {_type_name(tp)}, got {type(value).__name__} {shown} ({where})"
    )


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _bad_type(key, tp, value, where)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, where)
            except ConfigError as exc:
                errors.append(exc)
        # A union of one dataclass (Optional[X]) should surface X's precise message.
        if len(errors) == 1:
            raise errors[0]
        raise _bad_type(key, tp, value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(repr(c) for c in choices)}, got {value!r} ({where})"
            )
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, key, where)
    if origin in (list, Sequence):
        if not isinstance(value, list):
            raise _bad_type(key, tp, value, where)
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{key}.{i}", where) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad_type(key, tp, value, where)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}.{i}", where) for i, v in enumerate(value))
        if len(args) != len(value):
            raise _bad_type(key, tp, value, where)
        return tuple(_convert(a, v, f"{key}.{i}", where) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise _bad_type(key, tp, value, where)
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {
            _convert(kt, k, f"{key}.{k}", where): _convert(vt, v, f"{key}.{k}", where) for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad_type(key, tp, value, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad_type(key, tp, value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept what float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _bad_type(key, tp, value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad_type(key, tp, value, where)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _bad_type(key, tp, value, where)


def _convert_dataclass(cls: type, value: Any, key: str, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            f"config key '{key or '<root>'}' must be a mapping of {cls.__name__} keys, "
            f"got {type(value).__name__} {value!r} ({where})"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _field_types(cls)
    for name in value:
        if name not in fields:
            dotted = f"{key}.{name}" if key else str(name)
            raise ConfigError(_unknown_key_message(dotted, str(name), list(fields), where))
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{key}.{name}" if key else name
        if name in value:
            given = value[name]
            default = _default_of(f)
            if isinstance(given, dict) and dataclasses.is_dataclass(default):
                # A partial section overrides the field's own default, key by key: the
                # keys it does not name keep that default, not the bare class defaults.
                given = _deep_merge(dataclasses.asdict(default), given)
            kwargs[name] = _convert(hints[name], given, dotted, where)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"config key '{dotted}' is required ({where})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key '{key or '<root>'}': {exc} ({where})") from None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
