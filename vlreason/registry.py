"""Recipes by name: the one place a recipe is registered and found.

A recipe registers itself where it is defined::

    from vlreason.recipe_base import Recipe
    from vlreason.registry import register_recipe

    @register_recipe("grpo")
    class GRPORecipe(Recipe): ...

``recipe_class(spec)`` finds the class ``vlreason train SPEC`` runs. ``SPEC`` is

* a name: a built-in recipe (a module of the ``recipes`` package with a
  ``@register_recipe("NAME")`` line), or one registered by a module already imported;
* ``path/to/my_recipe.py`` (optionally ``path/to/my_recipe.py:Class``): a user's file,
  loaded like a script (its folder goes on ``sys.path`` so it can import its neighbours);
* ``package.module:Class`` (or ``package.module``): a module on ``sys.path`` (the current
  directory is tried last, as with ``python -m``).

In a file or module without ``:Class``, the recipe is the one class registered there with
``@register_recipe``, else the one class defined there that looks like a recipe (it has
``config_class``, ``default_model``, ``setup``, ``train`` and ``cleanup``).

There is one recipe interface: ``vlreason.recipe_base.Recipe``, whose subclasses inherit
``train``, ``cleanup`` and the loop's hooks with their defaults (``after_update`` does
nothing, ``state_dict`` is ``{}``, ``load_state_dict`` restores nothing); the loop's part
of it is described in ``vlreason.train.loop``. A class that does not subclass it must
define all of them itself.

The built-in names are found by reading the decorator lines of the ``recipes`` package's
modules, without importing any of them: ``vlreason --help`` lists them and stays fast
(no torch import). Nothing here imports a recipe statically; this module imports nothing
from vlreason, so every layer may use it (``tests/test_layers.py``).

``resolve_entry_point("package.module:attr")`` is the same lazy lookup for other things
the command line runs by name (the ``data_pipelines`` preprocessing behind
``vlreason preprocess``), so that no module of vlreason imports them statically.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

BUILTIN_PACKAGE = "recipes"
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_DECORATOR = re.compile(r"^@register_recipe\(\s*[\"']([A-Za-z][A-Za-z0-9_-]*)[\"']\s*\)", re.MULTILINE)
RECIPE_INTERFACE = ("config_class", "default_model", "setup", "train", "cleanup")

# name -> recipe class, filled by @register_recipe as modules are imported.
_REGISTERED: dict[str, type] = {}


class RecipeError(ValueError):
    """A recipe spec that cannot be run: unknown name, missing file or module, not a recipe."""


class RecipeNotFound(RecipeError, LookupError):
    """No recipe answers to this spec."""


def _origin(cls: type) -> tuple[str | None, str]:
    """Where a class was defined: its source file (or module name) and qualified name.
    The same file imported under two module names (``python recipes/grpo.py`` and
    ``recipes.grpo``) is the same recipe."""
    module = sys.modules.get(cls.__module__)
    where = getattr(module, "__file__", None)
    return (os.path.realpath(where) if where else cls.__module__), cls.__qualname__


def register_recipe(name: str):
    """Class decorator: make ``cls`` runnable as ``vlreason train NAME``."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"recipe name {name!r}: use letters, digits, '_' and '-', starting with a letter")

    def decorate(cls: type) -> type:
        old = _REGISTERED.get(name)
        if old is not None and _origin(old) != _origin(cls):
            taken_by = f"{old.__module__}.{old.__qualname__}"
        elif old is None and name in _builtin_files() and _builtin_files()[name] != _origin(cls)[0]:
            taken_by = f"the built-in recipe {builtin_recipes()[name]}"
        else:
            _REGISTERED[name] = cls
            return cls
        raise RecipeError(
            f"recipe name {name!r} is taken by {taken_by}; "
            f"{cls.__module__}.{cls.__qualname__} needs another name"
        )

    return decorate


@lru_cache(maxsize=1)
def _builtin_table() -> tuple[tuple[str, str, str], ...]:
    """(name, module, real path of its file) for each built-in recipe."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return ()
    table = {}
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("*.py")):
            for name in _DECORATOR.findall(path.read_text(encoding="utf-8")):
                table.setdefault(name, (f"{BUILTIN_PACKAGE}.{path.stem}", os.path.realpath(path)))
    return tuple((name, module, file) for name, (module, file) in table.items())


def builtin_recipes() -> dict[str, str]:
    """The built-in recipes, ``name -> module``, read from the decorator lines of the
    ``recipes`` package's modules (none of them is imported)."""
    return {name: module for name, module, _ in _builtin_table()}


def _builtin_files() -> dict[str, str]:
    return {name: file for name, _, file in _builtin_table()}


def available_recipes() -> list[str]:
    """Every recipe name: the built-ins and those registered by imported modules."""
    return sorted(set(builtin_recipes()) | set(_REGISTERED))


def recipe_class(spec: str) -> type:
    """The recipe class for a name, ``path/to/recipe.py[:Class]`` or ``package.module[:Class]``."""
    path, _, attr = _split_spec(spec)
    if path.endswith(".py") or "/" in path or os.sep in path:
        module = _load_file(path)
    elif ":" in spec or "." in path:
        module = _import_module(path)
    else:
        return _by_name(spec)
    if attr:
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise RecipeNotFound(f"{module.__name__} ({path}) has no class {attr!r}")
        return _checked(cls, spec)
    return _checked(_only_recipe_in(module, spec), spec)


def _split_spec(spec: str) -> tuple[str, str, str]:
    path, sep, attr = spec.rpartition(":")
    if not sep or not attr.isidentifier():  # no ':Class' part (or a Windows drive letter)
        return spec, "", ""
    return path, sep, attr


def _by_name(name: str) -> type:
    if name in _REGISTERED:
        return _REGISTERED[name]
    builtins = builtin_recipes()
    if name not in builtins:
        names = available_recipes()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeNotFound(
            f"unknown recipe {name!r}{hint}; available: {', '.join(names)}; "
            "or give path/to/recipe.py or package.module:Class"
        )
    importlib.import_module(builtins[name])
    if name not in _REGISTERED:
        raise RecipeError(f"{builtins[name]} has a @register_recipe({name!r}) line but registered nothing")
    return _REGISTERED[name]


def _load_file(path: str):
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise RecipeNotFound(f"recipe file {path} does not exist")
    for module in list(sys.modules.values()):  # loaded before: the same module object
        where = getattr(module, "__file__", None)
        if where and os.path.realpath(where) == str(file):
            return module
    name = "vlreason_user_recipe_" + re.sub(r"\W", "_", file.stem)
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))  # like `python my_recipe.py`: neighbours import
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_module(name: str):
    """Import ``name`` from ``sys.path``, then from the current directory; a missing
    module is a ``RecipeNotFound``, a missing import inside it propagates as it is."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
            raise
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise
    raise RecipeNotFound(f"no module named {name!r} (is its folder on PYTHONPATH?)")


def _only_recipe_in(module, spec: str) -> type:
    registered = [c for c in _REGISTERED.values() if c.__module__ == module.__name__]
    found = registered or [
        c for c in vars(module).values()
        if isinstance(c, type) and c.__module__ == module.__name__ and _looks_like_recipe(c)
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        raise RecipeNotFound(
            f"{spec}: no recipe class found (a class with {', '.join(RECIPE_INTERFACE)}, "
            "or one marked @register_recipe)"
        )
    names = ", ".join(sorted(c.__name__ for c in found))
    raise RecipeError(f"{spec} defines several recipes ({names}); pick one with {spec}:Class")


def _looks_like_recipe(cls: type) -> bool:
    return all(hasattr(cls, attr) for attr in RECIPE_INTERFACE)


def _checked(cls: type, spec: str) -> type:
    missing = [attr for attr in RECIPE_INTERFACE if not hasattr(cls, attr)]
    if missing:
        raise RecipeError(f"{spec}: {cls.__name__} is not a recipe: it has no {', '.join(missing)}")
    return cls


def resolve_entry_point(spec: str):
    """``package.module:attr`` -> the object, imported only now; ``package.module`` -> the module."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module
