"""The core packages (models, data, adapters, evaluation, config, the serving engines) never import Ray or DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ray_med"
CORE = ["models", "data", "adapters", "evaluation"]
FORBIDDEN = {"ray", "deepspeed"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", CORE)
def test_core_sources_do_not_import_ray(package: str) -> None:
    files = sorted((PKG / package).rglob("*.py"))
    assert files, f"ray_med/{package} has no modules"
    offenders = {str(f.relative_to(PKG)): sorted(_imported_roots(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_core_loads_no_ray() -> None:
    code = (
        "import sys, ray_med.config, ray_med.errors, "
        + ", ".join(f"ray_med.{p}" for p in CORE)
        + "; bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'deepspeed'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_serving_core_is_ray_free() -> None:
    """Only app.py (the deployments) and deploy.py (running them) touch Ray; engines, config, schemas, client are plain."""
    files = [f for f in sorted((PKG / "serving").glob("*.py")) if f.name not in ("app.py", "deploy.py")]
    assert {f.name for f in files} >= {"engines.py", "config.py", "schemas.py"}
    offenders = {f.name: sorted(_imported_roots(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}
