"""The package's layers, checked on the source: imports flow downward only (docs/architecture.md).

ground → core → runners → adapters → faces: a module may import its own layer and the layers
before it, never one after. Adapters sit above the runners they wrap and below the faces that
serve them, so neither the core nor a runner can import an adapter. Every module must be in
`LAYERS` (a package's entry covers its submodules; the longest entry wins), so a new module
fails here until someone decides where it belongs. Imports inside functions count too: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "ifsteer"
ORDER = ("ground", "core", "runners", "adapters", "faces")
LAYERS = {
    # The root holds __version__ and a table of names it resolves on first use (no imports).
    "ifsteer": "ground",
    "ifsteer.errors": "ground",
    "ifsteer.paths": "ground",
    "ifsteer.instructions": "ground",
    "ifsteer.phrasings": "ground",
    "ifsteer.checks": "ground",
    "ifsteer.prompts": "ground",
    "ifsteer.models": "ground",
    "ifsteer.attention": "ground",
    "ifsteer.chat": "ground",
    "ifsteer.deciders": "ground",
    "ifsteer.rows": "ground",
    "ifsteer.splits": "ground",
    "ifsteer.rundir": "ground",
    "ifsteer.progress": "ground",
    "ifsteer.datasets": "ground",
    "ifsteer.validation": "ground",
    "ifsteer.vectors": "core",
    "ifsteer.steering": "core",
    "ifsteer.gguf_export": "core",
    "ifsteer.shipped": "core",
    "ifsteer.shipped.points": "core",  # id → point for the CLI and the server; callers extract
    "ifsteer.batching": "runners",
    "ifsteer.sampling": "runners",
    "ifsteer.jobs": "runners",
    "ifsteer.sharing": "runners",
    "ifsteer.transformers_compat": "runners",
    "ifsteer.batcher": "runners",
    "ifsteer.slots": "runners",
    "ifsteer.generation": "runners",
    "ifsteer.quality": "runners",
    "ifsteer.evaluation": "runners",
    "ifsteer.calibration": "runners",
    "ifsteer.shipped.build": "runners",
    "ifsteer.training": "runners",
    "ifsteer.backends": "adapters",
    "ifsteer.backends.vllm.offline": "adapters",  # lends the runners a queue; they never import it
    "ifsteer.report": "faces",
    "ifsteer.pipeline": "faces",
    "ifsteer.server": "faces",
    "ifsteer.cli": "faces",
    "ifsteer.cli.backend": "faces",  # chooses the runners' engine: the faces choose adapters
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer of the longest entry that is `module` or a package holding it (the root
    entry covers the root alone, not every module)."""
    owners = [m for m in LAYERS if module == m or (m != "ifsteer" and module.startswith(m + "."))]
    return LAYERS[max(owners, key=len)] if owners else None


def _is_package(module: str) -> bool:
    return all_modules().get(module, Path()).name == "__init__.py"


def imported(module: str, source: str) -> list[tuple[int, str]]:
    """(line, ifsteer module) for every import in `source`, relative ones resolved."""
    base = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                target = ".".join([*anchor, *([target] if target else [])])
            for alias in node.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in all_modules() else target))
    return [(line, name) for line, name in found if name.split(".")[0] == "ifsteer"]


def violations(module: str, source: str) -> list[str]:
    rank = ORDER.index(layer_of(module) or "faces")
    return [
        f"{module}:{line} ({ORDER[rank]}) imports {target} ({layer_of(target)})"
        for line, target in imported(module, source)
        if layer_of(target) is not None and ORDER.index(layer_of(target)) > rank
    ]


def test_every_module_has_a_layer_and_every_entry_a_module():
    assert layer_of("ifsteer.new_module") is None and layer_of("ifsteer.server.app") == "faces"
    modules = all_modules()
    assert [m for m in modules if layer_of(m) is None] == []
    assert [m for m in LAYERS if m not in modules] == []
    assert set(LAYERS.values()) <= set(ORDER)


def test_imports_flow_downward_only():
    found = []
    for module, path in all_modules().items():
        found += violations(module, path.read_text(encoding="utf-8"))
    assert found == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("ifsteer.vectors.files", "from ifsteer.evaluation import run_evaluation"),
        ("ifsteer.steering", "def f():\n    from ifsteer.backends.vllm import VLLMEngine"),
        ("ifsteer.rows", "import ifsteer.cli"),
        ("ifsteer.calibration.sweep", "from ifsteer import report"),
        ("ifsteer.backends.vllm.engine", "from ...cli import app"),
    ],
)
def test_an_upward_import_is_caught(module, source):
    assert len(violations(module, source)) == 1


def test_same_and_lower_layers_are_allowed():
    assert violations("ifsteer.cli.serve", "from ifsteer.backends import Limits") == []
    assert violations("ifsteer.backends.vllm", "from .engine import VLLMEngine") == []
    assert violations("ifsteer.vectors.files", "from ifsteer import __version__") == []


@pytest.mark.parametrize(
    "module",
    [
        "ifsteer",
        "ifsteer.cli",
        "ifsteer.rows",
        "ifsteer.rundir",
        "ifsteer.report",
        "ifsteer.evaluation.summary",
        "ifsteer.evaluation.store",
    ],
)
def test_modules_that_read_finished_runs_import_without_torch(module):
    # `ifsteer --help`, the report and the reference numbers must not pay for a model stack.
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr or f"{module} imported torch"


def test_the_public_names_resolve_from_the_root():
    import ifsteer

    assert ifsteer.__all__[0] == "__version__"
    for name in ifsteer.__all__:
        value = getattr(ifsteer, name)
        assert getattr(value, "__name__", name) == name or name == "__version__"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ifsteer.nope  # noqa: B018


MAX_LINES = 400
# Modules allowed past MAX_LINES, each with why and its own bound; none today, keep it so.
LONGER: dict[str, int] = {}


def test_modules_stay_short():
    # Short modules, one concern each (docs/architecture.md): a module that grows past the bound
    # is split by concern, as engine.py was (jobs, batcher, sharing, slots, transformers_compat).
    long = {
        name: lines
        for name, path in all_modules().items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines()))
        > LONGER.get(name, MAX_LINES)
    }
    assert long == {}
