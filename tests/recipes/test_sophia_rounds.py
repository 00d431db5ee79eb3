"""SOPHIA's paper rounds (sophia.rounds > 0): each round is collected in full with the VLM
frozen, written as a dataset of its own (kept/ canonical rows with `solution`,
collected.jsonl, summary.json), then trained on; a round on disk is reused on resume
(no reasoner call, even without the reasoner cache). The embedded default (warm-up SFT,
then one round) runs end to end and a repeat of it asks the reasoner nothing."""

from __future__ import annotations

import json
import shutil

from test_sophia_cache import CALLS, _run  # same directory (pytest puts it on sys.path)

from recipes.sophia import SophiaRecipe
from vlreason.config import load_config
from vlreason.data.schema import load_canonical
from vlreason.recipe_base import run_recipe
from vlreason.rewards.format import is_strict_format

ROUNDS = ["sophia.rounds=2", "sophia.rows_per_round=2", "sophia.steps_per_round=1", "save_steps=1"]


def test_rounds_are_collected_first_written_as_datasets_and_reused(tmp_path):
    CALLS.clear()
    records = _run(tmp_path, "a", *ROUNDS)
    # one collection per round (2 rows x 2 captions), before that round's update
    assert CALLS == [4, 4] and [r["sophia/round"] for r in records] == [0, 1]
    for r, rec in enumerate(records):
        out = tmp_path / "a" / "rounds" / f"round-{r:03d}"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rows"] == 2 and summary["kept_rows"] == 2 and summary["reasoner"]["calls"] == 1
        assert sum(summary["caption_reward_hist"].values()) == 4 and summary["caption_reward_hist"]["0.9-1.0"] == 4
        collected = [json.loads(x) for x in (out / "collected.jsonl").read_text().splitlines()]
        assert len(collected) == 2 and all(len(c["captions"]) == 2 and c["kept"] for c in collected)
        kept = load_canonical(out / "kept")
        assert len(kept) == 2 and all(is_strict_format(row["solution"]) for row in kept)
        assert {row["solution"] for row in kept} == {c["kept"] for c in collected}
        assert json.loads(kept[0]["meta"])["sophia_round"] == r
        assert rec["sophia/kept_rows"] == 2 and rec["loss"] > 0 and rec["reasoner/round_calls"] == 1
    # resume at the start of round 1 with the reasoner cache gone: round 1 comes from disk
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("*[0-9]"))
    shutil.rmtree(ckpts[-1])
    (tmp_path / "a" / "checkpoints" / "latest").unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "a" / "reasoner_cache")
    CALLS.clear()
    resumed = _run(tmp_path, "a", *ROUNDS, "resume=auto")
    assert CALLS == [] and resumed[-1]["sophia/round"] == 1
    assert resumed[-1]["sophia/kept_tokens"] == records[-1]["sophia/kept_tokens"]


def _round(run):
    out = run / "rounds" / "round-000"
    return (json.loads((out / "summary.json").read_text()),
            [json.loads(x) for x in (out / "collected.jsonl").read_text().splitlines()], load_canonical(out / "kept"))


def test_defaults_warm_up_then_run_a_round_and_a_repeat_asks_the_reasoner_nothing(tmp_path):
    """`vlreason train sophia` on defaults: warm-up SFT steps, then one round (collected
    with the VLM frozen, written as a dataset + summary, trained on); the same run again
    (another directory, the first run's reasoner cache) makes zero reasoner calls."""
    cfg = load_config(SophiaRecipe.config_class)
    s = cfg.sophia
    assert s.rounds >= 1 and s.warmup_steps >= 1 and cfg.max_steps == s.warmup_steps + s.rounds * s.steps_per_round
    common = ["progress=false", "trackers=[jsonl]"]
    run_recipe(SophiaRecipe, None, [f"output_dir={tmp_path / 'a'}", *common])
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, cfg.max_steps + 1))
    assert all(r.get("sophia/warmup") == 1 and r["loss"] > 0 for r in records[:s.warmup_steps])
    assert [r["sophia/round"] for r in records[s.warmup_steps:]] == [0] * s.steps_per_round
    summary, collected, kept = _round(tmp_path / "a")
    asked = s.rows_per_round * s.num_captions
    assert summary["rows"] == len(collected) == s.rows_per_round and summary["kept_rows"] == len(kept)
    assert sum(summary["caption_reward_hist"].values()) == asked
    assert summary["reasoner"]["cache_misses"] == asked and summary["reasoner"]["calls"] >= 1
    assert all(len(c["captions"]) == s.num_captions and len(c["solutions"]) == s.num_captions for c in collected)
    assert records[s.warmup_steps]["reasoner/round_calls"] == summary["reasoner"]["calls"]
    # the same round again: same warm-up, same frozen VLM, same captions -> all from the cache
    run_recipe(SophiaRecipe, None, [f"output_dir={tmp_path / 'b'}", *common,
                                    f"reasoner.cache_dir={tmp_path / 'a' / 'reasoner_cache'}"])
    again, collected_again, _ = _round(tmp_path / "b")
    assert again["reasoner"]["calls"] == 0 and again["reasoner"]["cache_hits"] == asked
    assert collected_again == collected
