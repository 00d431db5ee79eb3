"""SOPHIA's paper rounds (sophia.rounds > 0): each round is collected in full with the VLM
frozen, written as a dataset of its own (kept/ canonical rows with `solution`,
collected.jsonl, summary.json), then trained on; a round on disk is reused on resume
(no reasoner call, even without the reasoner cache)."""

from __future__ import annotations

import json
import shutil

from test_sophia_cache import CALLS, _run  # same directory (pytest puts it on sys.path)

from vlreason.data.schema import load_canonical
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
