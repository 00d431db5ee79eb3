"""``vlreason train RECIPE [--config FILE] [key=value ...]``.

RECIPE is a built-in name, ``path/to/my_recipe.py[:Class]`` or ``package.module:Class``
(``vlreason.registry`` finds it); every recipe gets the same config, command line and loop.
"""

from __future__ import annotations

import argparse
import sys

from vlreason.recipe_base import add_recipe_arguments, run_from_args
from vlreason.registry import RecipeError, available_recipes, recipe_class

SPEC_FORMS = "path/to/my_recipe.py or package.module:Class"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe",
        metavar="RECIPE",
        help=f"recipe to run: {', '.join(available_recipes())}, or {SPEC_FORMS}",
    )
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        recipe_cls = recipe_class(args.recipe)
    except RecipeError as err:
        print(f"vlreason train: error: {err}", file=sys.stderr)
        return 2
    return run_from_args(recipe_cls, args.recipe, args)
