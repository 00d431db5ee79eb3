"""`vlreason --help` lists the verbs of DESIGN.md, and each verb has --help."""

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
