"""Warm-up SFT inside the SOPHIA recipe: the first sophia.warmup_steps steps train on
rows' own `solution` (rows without one skipped), make no reasoner call, and then SOPHIA
proceeds; the step count includes the warm-up."""

from __future__ import annotations

import json

from test_sophia_cache import ANSWERS, CALLS, _png, scripted  # noqa: F401  (same directory)

from recipes.sophia import SophiaRecipe
from vlreason.config import load_config
from vlreason.data.schema import canonical_row, save_canonical
from vlreason.recipe_base import run_recipe


def test_warmup_steps_train_on_solutions_then_sophia_runs(tmp_path):
    warm = save_canonical([canonical_row(id=f"w{i}", images=[_png(a)], question=q, answer=a, source="test",
                                         solution=f"<think>warm {i}</think><answer>{a}</answer>" if i % 2 == 0 else None)
                           for i, (q, a) in enumerate(ANSWERS.items())], tmp_path / "warm")
    data = save_canonical([canonical_row(id=f"r{i}", images=[_png(a)], question=q, answer=a, source="test")
                           for i, (q, a) in enumerate(ANSWERS.items())], tmp_path / "data")
    args = [f"data.train={data}", "reasoner.kind=python", "reasoner.path=test_sophia_cache:scripted",
            "sophia.num_captions=2", "sophia.num_solutions=2", "sophia.caption_max_new_tokens=8",
            "prompts_per_step=2", "progress=false", "trackers=[jsonl]", f"output_dir={tmp_path / 'run'}",
            "sophia.rounds=0", "sophia.warmup_steps=1", f"sophia.warmup_data={warm}", "sophia.rows_per_round=2"]
    assert load_config(SophiaRecipe.config_class, None, args).max_steps == 2  # 1 warm-up + 1 SOPHIA step
    CALLS.clear()
    run_recipe(SophiaRecipe, None, args)
    first, second = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the warm-up step: the 2 rows with a solution, no reasoner call, a real update
    assert first["sophia/warmup"] == 1 and first["sophia/kept_rows"] == 2 and first["loss"] > 0
    assert "sophia/caption_reward" not in first
    # then SOPHIA: one reasoner call for 2 rows x 2 captions
    assert CALLS == [4] and "sophia/warmup" not in second and second["sophia/kept_rows"] == 2
