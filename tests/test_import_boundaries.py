"""The layer map: which ray_med package may import which, where Ray and DeepSpeed may appear, and lazy imports.

The map below is the architecture, written as data (``docs/architecture.md`` shows the
same picture). Every module's imports are read with ``ast`` and checked against it, and
the checker itself is shown failing on a small graph that breaks the map.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ray_med"

CORE = {"models", "data", "tasks", "adapters", "generation", "evaluation"}
BASE = {"errors", "config"}
# unit -> the units it may import. A unit is a top-level module or package of ray_med.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "runtime": BASE,
    "runs": BASE | {"runtime"},
    # The core: models, data, tasks, adapters, generation, evaluation. No Ray, no DeepSpeed, no jobs.
    "models": BASE,
    "data": BASE,
    "tasks": BASE | {"data", "models"},  # models: the image placeholder of multimodal prompts (models.vlm)
    "adapters": BASE | {"models"},
    "generation": BASE | {"tasks"},  # tasks: PromptTooLong, the error of a prompt past the context
    "evaluation": BASE | {"models", "data", "tasks", "adapters", "generation"},
    # Ray edges over the core.
    "corpus": BASE | {"runtime", "models", "data"},
    "training": BASE | {"runtime", "corpus"} | CORE,
    "serving": BASE | {"runtime", "injection"} | CORE,  # injection: the injected model's engine
    "federated": BASE | {"runtime", "training"} | CORE,  # training: the shared loop runs each client's epochs
    # FedKIM's server: the federated encoders injected into an LLM (interleaved with the federated rounds).
    "injection": BASE | {"runtime", "training", "federated"} | CORE,
    # LoRA sweeps on Ray Tune: the downstream stage's trials; serving: best/serve.yaml checked with Serve's schema.
    "tuning": BASE | {"runtime", "training", "serving"} | CORE,
    # The application: the job table, the command line, the pipeline of jobs.
    "registry": BASE | {"runtime", "runs", "corpus", "training", "serving", "federated", "injection", "tuning",
                        "pipeline"}
    | CORE,
    "pipeline": BASE | {"runtime", "runs", "registry", "corpus", "training", "serving", "federated", "injection",
                        "tuning"}
    | CORE,
    "cli": BASE | {"runtime", "registry"},
    # Cluster files: KubeRay manifests' checks; GPU sizing from memory_plan and training's meta model.
    "cluster": BASE | {"models", "training"},
}
# The only modules that import Ray (at module level); DeepSpeed only in the pretraining worker.
RAY_EDGES = {
    "corpus.build", "training.pretrain", "training.pretrain_worker", "training.downstream_worker",
    "training.worker", "training.trainer", "training.multimodal", "serving.app", "serving.deploy", "serving.deployments.replica",
    "serving.deployments.lm", "serving.deployments.classifier", "serving.deployments.gateway", "serving.deployments.vllm",
    "federated.executor", "federated.server", "injection.job", "tuning.sweep",
}
DEEPSPEED = {"training.pretrain_worker"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _unit(module: str) -> str:
    return module.split(".")[0]


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, inside a function) for every import in ``path``; relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, id(node) in in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:  # from .x import y
                base = _module_name(path).split(".")
                module = ".".join(["ray_med", *base[: len(base) - node.level + (path.name == "__init__.py")],
                                   module])
            out.append((module, node.lineno, id(node) in in_function))
    return out


def internal_graph() -> dict[str, set[str]]:
    """unit -> the ray_med units its modules import."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        unit = _unit(_module_name(path)) if path.parent != PKG or path.name != "__init__.py" else ""
        for module, _, _ in imports_of(path):
            if module.startswith("ray_med.") and unit:
                graph.setdefault(unit, set()).add(_unit(module[len("ray_med."):]))
    return graph


def violations(graph: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    """Every edge of ``graph`` the map does not allow (a unit missing from the map allows nothing)."""
    bad = []
    for unit, targets in sorted(graph.items()):
        for target in sorted(targets - {unit}):
            if target not in allowed.get(unit, set()):
                bad.append(f"{unit} -> {target}")
    return bad


def test_the_checker_catches_a_graph_that_breaks_the_map() -> None:
    allowed = {"models": {"errors"}, "errors": set(), "serving": {"models"}}
    assert violations({"models": {"errors"}, "serving": {"models"}}, allowed) == []
    broken = {"models": {"errors", "serving"}, "serving": {"models"}, "newcomer": {"models"}}
    assert violations(broken, allowed) == ["models -> serving", "newcomer -> models"]


def test_every_import_between_packages_follows_the_map() -> None:
    graph = internal_graph()
    assert set(graph) <= set(ALLOWED), f"units missing from the layer map: {sorted(set(graph) - set(ALLOWED))}"
    assert violations(graph, ALLOWED) == []


def test_the_core_never_imports_the_jobs_layers() -> None:
    for unit in CORE:
        assert not ALLOWED[unit] & {"training", "serving", "pipeline", "federated", "tuning", "runtime", "registry"}


@pytest.mark.parametrize("package", sorted(CORE))
def test_core_sources_do_not_import_ray(package: str) -> None:
    files = sorted((PKG / package).rglob("*.py"))
    assert files, f"ray_med/{package} has no modules"
    offenders = {str(f.relative_to(PKG)): sorted({m.split(".")[0] for m, _, _ in imports_of(f)} & {"ray", "deepspeed"})
                 for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_ray_and_deepspeed_only_at_the_edges() -> None:
    ray_users, ds_users = set(), set()
    for path in sorted(PKG.rglob("*.py")):
        for module, _, lazy in imports_of(path):
            root = module.split(".")[0]
            if root == "ray" and not lazy:
                ray_users.add(_module_name(path))
            if root == "deepspeed":
                ds_users.add(_module_name(path))
    assert ray_users <= RAY_EDGES, f"Ray imported outside the edges: {sorted(ray_users - RAY_EDGES)}"
    assert ds_users <= DEEPSPEED


def test_imports_inside_functions_say_why() -> None:
    """A function-level import is for a heavy optional dependency, with a `# lazy:` reason."""
    missing = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text().splitlines()
        for _, line, lazy in imports_of(path):
            if not lazy:
                continue
            # The reason sits on the import's line, or on a comment line above a block of
            # imports (sorted into groups separated by blank lines).
            i = line - 1
            while i > 0 and (lines[i - 1].strip().startswith(("import ", "from ")) or not lines[i - 1].strip()):
                i -= 1
            here, above = lines[line - 1], lines[i - 1].strip() if i > 0 else ""
            if "# lazy:" not in here and not above.startswith("# lazy:"):
                missing.append(f"{path.relative_to(PKG)}:{line}")
    assert missing == []


def test_importing_the_core_and_the_job_table_loads_no_ray_and_no_torch_for_the_table() -> None:
    code = (
        "import sys, ray_med.config, ray_med.errors, ray_med.registry\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'deepspeed', 'torch', 'transformers'})\n"
        "import " + ", ".join(f"ray_med.{p}" for p in sorted(CORE)) + "\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'deepspeed'})\n"
        "print(heavy, bad); sys.exit(1 if heavy or bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_federated_maths_is_ray_free() -> None:
    """Strategies, partitions, DP, masks, models, data and the client's training never import Ray."""
    pure = ["partition", "strategies", "privacy", "secagg", "models", "data", "client", "config", "evaluate"]
    offenders = {m: sorted({i.split(".")[0] for i, _, _ in imports_of(PKG / "federated" / f"{m}.py")} & {"ray"})
                 for m in pure}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_serving_core_is_ray_free() -> None:
    """Only app.py, deploy.py and deployments/ touch Ray; engines, config, schemas, errors and client are plain."""
    files = [f for f in sorted((PKG / "serving").glob("*.py")) if f.name not in ("app.py", "deploy.py")]
    assert {f.name for f in files} >= {"engines.py", "config.py", "schemas.py", "errors.py"}
    offenders = {f.name: sorted({m.split(".")[0] for m, _, _ in imports_of(f)} & {"ray", "deepspeed"}) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}
