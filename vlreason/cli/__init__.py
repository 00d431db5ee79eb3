"""The ``vlreason`` command line: one module per verb, imported only when used.

Each verb module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Adding a verb is one entry in ``VERBS``. Recipes are not verbs:
they register themselves (``vlreason.registry``) and run under ``vlreason train``.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _train_help() -> str:
    """The built-in recipes, read by the registry without importing any of them."""
    from vlreason.registry import builtin_recipes

    names = ", ".join(sorted(builtin_recipes())) or "none found"
    return f"train a recipe: {names}; or path/to/my_recipe.py, package.module:Class"


VERBS: dict[str, tuple[str, str]] = {
    "train": ("vlreason.cli.train", _train_help()),
    "eval": ("vlreason.cli.evaluate", "evaluate a model on a canonical dataset -> JSON report"),
    "preprocess": ("vlreason.cli.preprocess", "raw data -> canonical dataset + report.json"),
    "preview": ("vlreason.cli.preview", "draw original and image view side by side -> PNG"),
    "tiny-model": ("vlreason.cli.tiny_model", "build a tiny random Qwen-VL checkpoint offline"),
    "plot": ("vlreason.cli.plot", "draw a run's training curves -> PNG"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``verb``'s module is imported to define its arguments."""
    parser = argparse.ArgumentParser(
        prog="vlreason",
        description="Reasoning-oriented post-training of vision-language models.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module_name)
        # Argument definitions live in the verb's module; import it only for the verb
        # being run, so `vlreason --help` stays fast.
        if name == verb:
            importlib.import_module(module_name).add_arguments(verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = argv[0] if argv and argv[0] in VERBS else None
    args = build_parser(verb).parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
