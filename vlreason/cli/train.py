"""``vlreason train RECIPE [--config FILE] [key=value ...]``."""

from __future__ import annotations

import argparse

from vlreason.recipe_base import RECIPES, add_recipe_arguments, recipe_class, run_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", choices=sorted(RECIPES), help="recipe to run")
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_from_args(recipe_class(args.recipe), args.recipe, args)
