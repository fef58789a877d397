"""The shared command line of every job: ``--config PATH`` plus ``key=value`` overrides.

Each file in ``jobs/`` is a thin ``main(argv) -> int`` that names its job in the
registry (:mod:`ray_med.registry`) and calls :func:`run_job`. This module loads the
config strictly, keeps the run's record (``run.json``: status, outputs, lineage) for
jobs that own a run folder, turns user mistakes (:class:`~ray_med.errors.RayMedError`)
into a one-line message and exit code 2, and leaves anything else, a bug, its traceback.
A job with subcommands (``evaluate qa|classify|perplexity``) is a group of registered
jobs named ``<group>.<sub>``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ray_med.config import describe, load_config, to_yaml
from ray_med.errors import EXIT_USER_ERROR, ConfigError, RayMedError
from ray_med.registry import JOBS, JobSpec, execute, get_job, subcommands
from ray_med.runtime import quiet_logs


def _config_help(spec: JobSpec) -> str:
    rows = describe(spec.config)
    width = max(len(k) for k, *_ in rows)
    lines = ["config keys (override any with key=value):"]
    for key, tp, default, doc in rows:
        lines.append(f"  {key:<{width}}  {tp} = {default}")
        if doc:
            lines.append(f"  {'':<{width}}    {doc}")
    if spec.aliases:
        lines.append("\nflags kept as aliases of config keys:")
        lines += [f"  {flag:<18} {key}" for flag, key in spec.aliases.items()]
    return "\n".join(lines)


def _parser(prog: str, spec: JobSpec, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description or spec.description, epilog=_config_help(spec),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default = spec.default_config
    parser.add_argument("--config", default=default,
                        help=f"YAML config file (default: {default})" if default else "YAML config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, key in spec.aliases.items():
        multi = key == "options"
        parser.add_argument(flag, dest=f"alias:{flag}", action="append" if multi else "store", default=None,
                            metavar="KEY=VALUE" if multi else key.rsplit(".", 1)[-1].upper(),
                            help=f"the config key {key}" + (" (repeatable)" if multi else ""))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.seed=1")
    return parser


def _alias_overrides(spec: JobSpec, args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in spec.aliases.items():
        value = getattr(args, f"alias:{flag}")
        if value is None:
            continue
        if isinstance(value, list):  # --option KEY=VALUE, repeatable: entries of a mapping
            for pair in value:
                sub, sep, v = pair.partition("=")
                if not sep or not sub:
                    raise ConfigError(f"{flag} {pair!r} is not KEY=VALUE")
                out.append(f"{key}.{sub}={v}")
        else:
            out.append(f"{key}={value}")
    return out


def run_job(argv: Sequence[str] | None, name: str, *, prog: str | None = None, description: str | None = None) -> int:
    """Run the registered job ``name`` (or the subcommand of the group ``name``) on the command line ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or name
    if name not in JOBS:
        return _run_group(argv, name, prog, description)
    spec = get_job(name)
    args = _parser(prog, spec, description).parse_args(argv)
    try:
        if args.config is not None and not Path(args.config).is_file():
            raise ConfigError(f"config file not found: {args.config}")
        overrides = [*_alias_overrides(spec, args), *args.overrides]
        cfg = load_config(spec.config, args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        quiet_logs()
        execute(spec, cfg, overrides=overrides)
    except RayMedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def _run_group(argv: list[str], group: str, prog: str, description: str | None) -> int:
    subs = subcommands(group)
    if not subs:
        print(f"{prog}: error: no job or job group named {group!r}; jobs: {', '.join(JOBS)}", file=sys.stderr)
        return EXIT_USER_ERROR
    usage = f"usage: {prog} {{{','.join(subs)}}} [--config PATH] [key=value ...]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        if description:
            print(f"\n{description.strip()}")
        print("\nsubcommands:")
        for sub, spec in subs.items():
            print(f"  {sub:<12} {spec.description}")
        print(f"\n{prog} SUBCOMMAND --help lists its config keys.")
        return 0 if argv else EXIT_USER_ERROR
    sub, rest = argv[0], argv[1:]
    if sub not in subs:
        print(f"{prog}: error: unknown subcommand {sub!r}; choose one of {', '.join(subs)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return run_job(rest, f"{group}.{sub}", prog=f"{prog} {sub}")
