"""vlreason.registry: how a recipe spec becomes a recipe class (the runs themselves are in
tests/cli/test_train_user_recipe.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vlreason import registry
from vlreason.registry import RecipeError, RecipeNotFound, recipe_class, register_recipe

BUILTINS = {"grpo": "recipes.grpo", "sft": "recipes.sft", "vision_r1": "recipes.vision_r1",
            "vision_opd": "recipes.vision_opd", "dvrp": "recipes.dvrp", "sophia": "recipes.sophia"}

RECIPE_BODY = '''
class {cls}:
    config_class = dict

    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def default_model():
        return ""

    def setup(self):
        pass

    def train(self):
        pass

    def cleanup(self):
        pass
'''


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Registrations, sys.path entries and user modules made by a test stay in that test
    (a built-in imported meanwhile keeps its registration: its module stays imported)."""
    saved = dict(registry._REGISTERED)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    builtins = registry.builtin_recipes()
    saved.update({n: c for n, c in registry._REGISTERED.items() if builtins.get(n) == c.__module__})
    registry._REGISTERED.clear()
    registry._REGISTERED.update(saved)
    for name in set(sys.modules) - before:
        if name.startswith("vlreason_user_recipe_"):
            del sys.modules[name]


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(text)
    return path


def test_builtin_names_come_from_the_decorator_lines():
    assert registry.builtin_recipes() == BUILTINS
    assert set(BUILTINS) <= set(registry.available_recipes())


def test_builtin_name_resolves_to_the_registered_class():
    from recipes.grpo import GRPORecipe

    assert recipe_class("grpo") is GRPORecipe
    assert recipe_class("recipes.grpo:GRPORecipe") is GRPORecipe
    assert recipe_class("recipes.grpo") is GRPORecipe  # the one recipe registered there


def test_file_without_decorator_picks_its_one_recipe_class(tmp_path):
    path = write(tmp_path, "plain_recipe", "from pathlib import Path\n" + RECIPE_BODY.format(cls="Plain"))
    cls = recipe_class(str(path))
    assert cls.__name__ == "Plain"
    assert recipe_class(f"{path}:Plain") is cls  # loaded once
    assert str(tmp_path) in sys.path  # its neighbours import, as for `python plain_recipe.py`


def test_file_with_two_recipes_needs_a_class(tmp_path):
    path = write(tmp_path, "two_recipes", RECIPE_BODY.format(cls="A") + RECIPE_BODY.format(cls="B"))
    with pytest.raises(RecipeError, match=r"several recipes \(A, B\); pick one with .*:Class"):
        recipe_class(str(path))
    assert recipe_class(f"{path}:B").__name__ == "B"
    with pytest.raises(RecipeNotFound, match="has no class 'C'"):
        recipe_class(f"{path}:C")


def test_a_class_that_is_not_a_recipe_is_refused(tmp_path):
    path = write(tmp_path, "not_recipe", "class Helper:\n    def setup(self):\n        pass\n")
    with pytest.raises(RecipeError, match="Helper is not a recipe: it has no config_class, default_model"):
        recipe_class(f"{path}:Helper")
    with pytest.raises(RecipeNotFound, match="no recipe class found"):
        recipe_class(str(path))


def test_a_missing_import_inside_a_user_module_is_not_hidden(tmp_path, monkeypatch):
    write(tmp_path, "broken_recipe", "import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        recipe_class("broken_recipe:Anything")


def test_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    write(tmp_path, "cwd_recipe_mod", RECIPE_BODY.format(cls="Here"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert recipe_class("cwd_recipe_mod:Here").__name__ == "Here"
    sys.modules.pop("cwd_recipe_mod", None)


def test_a_name_is_registered_once():
    @register_recipe("dup-name")
    class First:
        pass

    assert recipe_class("dup-name") is First
    with pytest.raises(RecipeError, match="'dup-name' is taken by .*First"):
        @register_recipe("dup-name")
        class Second:
            pass

    with pytest.raises(ValueError, match="recipe name"):
        register_recipe("has space")


def test_a_builtin_name_belongs_to_its_file(tmp_path):
    path = write(tmp_path, "my_grpo", "from vlreason.registry import register_recipe\n\n@register_recipe('grpo')"
                 + RECIPE_BODY.format(cls="Impostor"))
    with pytest.raises(RecipeError, match=r"'grpo' is taken by (the built-in recipe )?recipes\.grpo"):
        recipe_class(str(path))
    builtin = Path(registry.__file__).parents[1] / "recipes" / "grpo.py"
    assert recipe_class(str(builtin)).__name__ == "GRPORecipe"  # its own file, by path: the same recipe


def test_the_same_file_under_two_module_names_is_one_recipe(tmp_path):
    text = "from vlreason.registry import register_recipe\n\n@register_recipe('twice')" + RECIPE_BODY.format(cls="Twice")
    path = write(tmp_path, "twice_recipe", text)
    first = recipe_class(str(path))
    sys.path.insert(0, str(tmp_path))
    try:
        second = recipe_class("twice_recipe:Twice")  # a new module object, the same file
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("twice_recipe", None)
    assert first is not second and recipe_class("twice") is second


def test_entry_points_resolve_lazily():
    assert registry.resolve_entry_point("vlreason.paths:assets_dir")().is_dir()
    assert registry.resolve_entry_point("data_pipelines.preprocess").REPORT_NAME
