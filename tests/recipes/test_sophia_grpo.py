"""The paper's "+GRPO" row from one SOPHIA config: sophia.grpo_steps GRPO steps run after
the SOPHIA round in the same run (GRPO's rollout, reward and loss; no reasoner call),
counted in max_steps; a KL term is refused."""

from __future__ import annotations

import json

import pytest
from test_sophia_cache import CALLS, _run  # noqa: F401  (same directory)

from recipes.sophia import SophiaRecipe
from vlreason.config import load_config

GRPO = ["sophia.rounds=1", "sophia.rows_per_round=2", "sophia.steps_per_round=1", "sophia.grpo_steps=2",
        "prompts_per_step=2", "grpo.micro_batch_prompts=2", "rollout.num_generations=2",
        "rollout.max_new_tokens=8"]


def test_grpo_steps_follow_the_sophia_round(tmp_path):
    cfg = load_config(SophiaRecipe.config_class, None, ["sophia.warmup_steps=1", *GRPO])
    assert cfg.max_steps == 1 + 1 + 2
    with pytest.raises(ValueError, match="kl_coef"):
        load_config(SophiaRecipe.config_class, None, [*GRPO, "grpo.kl_coef=0.01"])
    CALLS.clear()
    records = _run(tmp_path, "a", *GRPO)  # _run: warm-up off, scripted reasoner
    assert [r["step"] for r in records] == [1, 2, 3]
    # step 1: the round (one reasoner call: 2 rows x 2 captions), trained on its kept rows
    assert CALLS == [4] and records[0]["sophia/round"] == 0 and records[0]["sophia/kept_rows"] == 2
    assert "sophia/grpo" not in records[0] and "reward" not in records[0]
    # steps 2-3: GRPO on data.train, G=2 completions of 2 prompts each, no reasoner call
    for r in records[1:]:
        assert r["sophia/grpo"] == 1 and "reward" in r and "sophia/round" not in r and "loss" in r
    summary = json.loads((tmp_path / "a" / "rounds" / "round-000" / "summary.json").read_text())
    assert summary["reasoner"]["calls"] == 1
