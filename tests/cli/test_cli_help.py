"""`vlreason --help` lists the verbs of DESIGN.md and the built-in recipes (from the
registry, without importing them), and each verb has --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlreason.cli import VERBS, main

DESIGN_VERBS = ["train", "eval", "preprocess", "preview", "tiny-model", "plot"]


def test_top_level_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "vlreason", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in DESIGN_VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", DESIGN_VERBS)
def test_each_verb_has_help(verb, capsys):
    assert verb in VERBS
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert "usage: vlreason " + verb in capsys.readouterr().out


def test_recipe_script_equals_cli_verb():
    root = Path(__file__).parents[2]
    script = subprocess.run([sys.executable, str(root / "recipes" / "grpo.py"), "--show-config"],
                            capture_output=True, text=True, check=True).stdout
    verb = subprocess.run([sys.executable, "-m", "vlreason", "train", "grpo", "--show-config"],
                          capture_output=True, text=True, check=True).stdout
    assert script == verb and "rollout.num_generations = 8" in script


def test_top_level_help_lists_builtin_recipes_without_importing_them():
    # `vlreason --help` stays fast: the registry reads the recipes' decorator lines,
    # so neither torch nor any recipe module is imported to list them.
    code = (
        "import sys\n"
        "from vlreason.cli import build_parser\n"
        "print(build_parser().format_help())\n"
        "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'recipes')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    from vlreason.registry import builtin_recipes

    names = sorted(builtin_recipes())
    assert names == ["dvrp", "grpo", "sft", "sophia", "vision_opd", "vision_r1"]
    assert "train a recipe: " + ", ".join(names) in " ".join(out.split())
    assert "path/to/my_recipe.py" in out
    assert "IMPORTED []" in out


def test_train_help_names_every_form_of_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "recipe to run: dvrp, grpo, sft, sophia, vision_opd, vision_r1" in out
    assert "or path/to/my_recipe.py or package.module:Class" in out
