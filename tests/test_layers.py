"""Imports only point down the layers of DESIGN.md.

Every module of ``vlreason/``, ``recipes/`` and ``data_pipelines/`` is parsed with ``ast``
(module-level and function-level imports alike, relative imports resolved) and each
import of a project module is checked against ``ALLOWED`` below. A new module outside
the table, a new upward import, or a known violation that has been fixed without being
struck from ``KNOWN_VIOLATIONS`` fails the test.

The layers (DESIGN.md, top to bottom), and where the top-level modules sit:

    vlreason.cli, vlreason.__main__  the command line: may import any of vlreason, but
                                     never recipes/ or data_pipelines/ statically; it
                                     runs them by name through vlreason.registry
    recipes                          one module per method; never another recipe
    vlreason.recipe_base             what recipes share outside the loop (run_recipe, ...)
    vlreason.train                   the loop
    vlreason.evaluation              greedy held-out evaluation of a Policy (recipes, the
                                     loop and the eval verb use it; it uses the rollout)
    vlreason.rollout                 Policy use: sampling, log-probs, the batch object
    vlreason.reasoners               external text-only samplers (SOPHIA): rollout level
    vlreason.reasoner_cache          the reasoners' on-disk call cache: rollout level
    vlreason.algorithms              pure tensor functions: import nothing of vlreason
    vlreason.rewards                 pure functions: import nothing of vlreason
    vlreason.views                   image views: models, data and utilities below them
    vlreason.models                  loading, families, tiny builder: data and utilities
    vlreason.data                    the schema: utilities only
    vlreason.plotting                draws a run directory: utilities only (a leaf)
    utilities                        vlreason (the package), vlreason.config,
                                     vlreason.paths, vlreason.outputs, vlreason.registry:
                                     importable from anywhere, import only each other

    data_pipelines                   offline tooling beside vlreason: it writes the schema
                                     vlreason.data reads and may use any of vlreason
                                     except the command line; recipes only by name
                                     (vlreason.registry), never by import.

The order of the bottom five follows DESIGN.md's diagram strictly (views above models
above data); algorithms and rewards are stricter than their place because DESIGN.md
calls them pure (no config objects, no I/O). Names resolved at run time by
``vlreason.registry`` (built-in recipes, ``vlreason preprocess``'s pipeline) are not
imports; the registry is the one place such names live.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vlreason", "recipes", "data_pipelines")

UTILITIES = {"vlreason", "vlreason.config", "vlreason.paths", "vlreason.outputs", "vlreason.registry"}
_DATA = {"vlreason.data"} | UTILITIES
_MODELS = {"vlreason.models"} | _DATA
_VIEWS = {"vlreason.views"} | _MODELS
_BOTTOM = {"vlreason.algorithms", "vlreason.rewards"} | _VIEWS
_ROLLOUT = {"vlreason.rollout", "vlreason.reasoners", "vlreason.reasoner_cache"} | _BOTTOM
_EVALUATION = {"vlreason.evaluation"} | _ROLLOUT
_TRAIN = {"vlreason.train", "vlreason.plotting"} | _EVALUATION
_RECIPE_BASE = {"vlreason.recipe_base"} | _TRAIN
_LIBRARY = _RECIPE_BASE  # every layer of vlreason below the command line

# layer -> the layers its modules may import (its own layer included).
ALLOWED: dict[str, set[str]] = {
    "vlreason.cli": {"vlreason.cli"} | _LIBRARY,
    "vlreason.__main__": {"vlreason.cli"},
    "recipes": {"recipes"} | _LIBRARY,  # "recipes" = the package itself, not a sibling recipe
    "vlreason.recipe_base": _RECIPE_BASE,
    "vlreason.train": _TRAIN,
    "vlreason.plotting": {"vlreason.plotting"} | UTILITIES,
    "vlreason.evaluation": _EVALUATION,
    "vlreason.rollout": _ROLLOUT,
    "vlreason.reasoners": _ROLLOUT,
    "vlreason.reasoner_cache": _ROLLOUT,
    "vlreason.algorithms": {"vlreason.algorithms"},
    "vlreason.rewards": {"vlreason.rewards"},
    "vlreason.views": _VIEWS,
    "vlreason.models": _MODELS,
    "vlreason.data": _DATA,
    "data_pipelines": {"data_pipelines"} | _LIBRARY,
    **{utility: UTILITIES for utility in UTILITIES},
}

# (importing module, imported module) pairs that break the table today. Strike a pair
# from here in the change that fixes it: a listed pair that no longer occurs fails the
# test, so this list only shrinks. (Issue 10 moved Policy from vlreason.models into
# vlreason.rollout, which removed the last five.)
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def layer_of(module: str) -> str:
    """``vlreason.X.Y`` -> ``vlreason.X``; ``recipes.grpo`` -> ``recipes``."""
    parts = module.split(".")
    if parts[0] == "vlreason":
        return ".".join(parts[:2])
    return parts[0]


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in it (functions included);
    ``from pkg import mod`` counts as importing ``pkg.mod``."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in PACKAGES)
    return found


def import_violations() -> tuple[set[tuple[str, str]], set[str]]:
    modules = project_modules()
    known = set(modules)
    violations, unplaced = set(), set()
    for name, path in modules.items():
        layer = layer_of(name)
        if layer not in ALLOWED:
            unplaced.add(name)
            continue
        for target in imports_of(name, path, known):
            if layer == "recipes" and target not in ("recipes", name) and layer_of(target) == "recipes":
                violations.add((name, target))  # recipes never import each other
            elif layer_of(target) not in ALLOWED[layer]:
                violations.add((name, target))
    return violations, unplaced


def test_every_module_has_a_layer():
    _, unplaced = import_violations()
    assert not unplaced, f"modules outside the layer table of tests/test_layers.py: {sorted(unplaced)}"


def test_no_new_upward_import():
    violations, _ = import_violations()
    new = sorted(violations - KNOWN_VIOLATIONS)
    assert not new, "imports that point up the layers of DESIGN.md (see ALLOWED in tests/test_layers.py):\n" + \
        "\n".join(f"  {a} imports {b}" for a, b in new)


def test_known_violations_still_exist():
    violations, _ = import_violations()
    fixed = sorted(KNOWN_VIOLATIONS - violations)
    assert not fixed, f"fixed: strike these from KNOWN_VIOLATIONS in tests/test_layers.py: {fixed}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    # a throwaway package tree laid out like the project's, with one of each kind of import
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "vlreason" / "data").mkdir()
    (tmp_path / "vlreason" / "data" / "__init__.py").write_text("")
    (tmp_path / "vlreason" / "data" / "schema.py").write_text(
        "from . import images\nfrom ..rollout import batch\n\ndef f():\n    from vlreason.train import loop\n")
    (tmp_path / "vlreason" / "data" / "images.py").write_text("import recipes.grpo\n")
    (tmp_path / "vlreason" / "newthing.py").write_text("")
    (tmp_path / "recipes" / "grpo.py").write_text("from recipes import sft\nfrom vlreason.data import schema\n")
    (tmp_path / "recipes" / "sft.py").write_text("")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    violations, unplaced = import_violations()
    assert violations == {
        ("vlreason.data.schema", "vlreason.rollout"),   # relative, upward
        ("vlreason.data.schema", "vlreason.train"),     # function-level, upward
        ("vlreason.data.images", "recipes.grpo"),       # vlreason never imports recipes
        ("recipes.grpo", "recipes.sft"),                # recipes never import each other
    }
    assert unplaced == {"vlreason.newthing"}
