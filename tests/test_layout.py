"""The package's architecture, enforced: each folder is a layer, imports flow one way.

    stages (cli, extract, fit_head, finetune/, export, predict, evaluate, similar, audit, demo)
      -> artifacts/ -> cache/, probe/ -> models/ -> data/ -> core/   (errors, config: anywhere)

Every import counts, also the lazy ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pipeline"
STAGES = {"cli", "extract", "fit_head", "finetune", "export", "predict", "evaluate", "similar", "audit", "demo"}
# What each layer may import from the package (besides itself, and ``errors``, ``config`` and
# ``__version__``, which import nothing else of the package and may be imported anywhere).
LAYERS = {
    "core": set(),
    "data": {"core"},
    "models": {"core", "data"},
    "cache": {"core", "data", "models"},
    "probe": {"core", "data"},
    "artifacts": {"core", "data", "models", "cache", "probe"},
}
# Orchestrators: the CLI runs every stage, the demo runs the whole pipeline.
MAY_IMPORT_STAGES = {"cli", "demo"}
MAX_LINES = 420


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append((".".join(["pipeline", *parts]), path))
    return out


def _imports(mod: str, path: Path) -> list[tuple[str, int]]:
    """Absolute names of the ``pipeline`` modules (or module attributes) ``path`` imports."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.append((f"{target}.{alias.name}", node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
    return found


def _top(name: str) -> str | None:
    """``pipeline.cache.store.Cache`` -> ``cache``; None outside the package."""
    parts = name.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def test_layers_import_only_layers_below_them_and_stages_no_other_stage():
    problems = []
    for mod, path in _modules():
        me = _top(mod)
        if me is None:
            continue
        for name, line in _imports(mod, path):
            other = _top(name)
            if other is None or other == me or other in ("errors", "config", "__version__"):
                continue
            where = f"{path.relative_to(PKG.parent)}:{line} imports {name}"
            if me in LAYERS:
                if other in STAGES:
                    problems.append(f"{where}: a layer imports a stage")
                elif other not in LAYERS[me]:
                    problems.append(f"{where}: {me}/ may import only {sorted(LAYERS[me]) or 'nothing'}")
            elif me in STAGES and other in STAGES and me not in MAY_IMPORT_STAGES:
                problems.append(f"{where}: a stage imports another stage")
    assert not problems, "\n".join(problems)


def test_errors_and_config_sit_below_every_layer():
    """What lets every layer import them without a cycle: ``errors`` imports nothing of the
    package; ``config`` (plain dataclasses) only ``errors`` and the output-path check
    ``core/paths.py``, which itself imports only ``errors``."""
    allowed = {"errors": set(), "config": {"pipeline.core.paths"}, "core/paths": set()}
    for name, ok in allowed.items():
        mod = "pipeline." + name.replace("/", ".")
        found = {n.rpartition(".")[0] for n, _ in _imports(mod, PKG / f"{name}.py") if _top(n) not in (None, "errors")}
        assert found <= ok, f"pipeline/{name}.py imports {found - ok}"


def test_only_the_cli_imports_click():
    users = [
        f"{path.relative_to(PKG.parent)}:{line}"
        for mod, path in _modules()
        for name, line in _imports(mod, path)
        if name == "click" or name.startswith("click.")
    ]
    assert users and all(u.startswith("pipeline/cli/") for u in users), users


@pytest.mark.parametrize("layer", ["cache", "probe"])
def test_cache_and_probe_import_no_torch_at_module_load(layer):
    """They run where torch is slow to import or absent (reading a cache, fitting a head)."""
    mods = [m for m, _ in _modules() if _top(m) == layer]
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + "print('torch' in sys.modules)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False", f"importing {mods} loads torch"


def test_no_module_is_over_the_size_limit():
    big = {
        str(p.relative_to(PKG.parent)): n for _, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"
