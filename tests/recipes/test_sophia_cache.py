"""The SOPHIA recipe with the reasoner cache (on by default): a repeated round (same
seed, same VLM) and a resumed round make zero reasoner calls and reproduce the first
run's selections; the per-step hit / miss counts are logged."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from PIL import Image

from recipes.sophia import SophiaRecipe
from vlreason.data.schema import canonical_row, save_canonical
from vlreason.recipe_base import run_recipe

ANSWERS = {"What colour is shape one?": "red", "What colour is shape two?": "blue",
           "What colour is shape three?": "green", "What colour is shape four?": "red"}
CALLS: list[int] = []  # prompts per solve() call, over every reasoner built in this module


class Scripted:
    """Correct and well formed for every prompt (seed-dependent think text)."""

    def solve(self, prompts, n, max_new_tokens, temperature, seed):
        CALLS.append(len(prompts))
        return [[f"<think>seed {seed} j {j}</think><answer>{ANSWERS[next(q for q in ANSWERS if q in p)]}</answer>"
                 for j in range(n)] for p in prompts]


def scripted(cfg) -> Scripted:
    return Scripted()


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (84, 84), color).save(buf, "PNG")
    return buf.getvalue()


def _run(tmp_path: Path, out: str, *extra: str) -> list[dict]:
    data = tmp_path / "data"
    if not data.exists():
        save_canonical([canonical_row(id=f"r{i}", images=[_png(a)], question=q, answer=a, source="test")
                        for i, (q, a) in enumerate(ANSWERS.items())], data)
    run_recipe(SophiaRecipe, None, [f"data.train={data}", "reasoner.kind=python", f"reasoner.path={__name__}:scripted",
                                    "sophia.num_captions=2", "sophia.num_solutions=2", "sophia.caption_max_new_tokens=8",
                                    "prompts_per_step=2", "max_steps=2", "sophia.rounds=0", "sophia.warmup_steps=0", "sophia.rows_per_round=0",  "progress=false", "trackers=[jsonl]",
                                    f"output_dir={tmp_path / out}", *extra])
    return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]


def _kept(records):
    return [(r["step"], r["sophia/kept_rows"], r["sophia/kept_tokens"], r["sophia/caption_reward"]) for r in records]


def test_a_repeated_and_a_resumed_round_make_no_reasoner_calls(tmp_path):
    CALLS.clear()
    first = _run(tmp_path, "a", "save_steps=1")
    assert CALLS == [4, 4]  # 2 rows x 2 captions per step, one call each
    assert [(r["reasoner/cache_hits"], r["reasoner/cache_misses"], r["reasoner/calls"]) for r in first] == [
        (0, 4, 1), (0, 4, 1)]
    assert all(r["sophia/kept_rows"] == 2 for r in first)
    cache = tmp_path / "a" / "reasoner_cache" / "calls-rank0.jsonl"
    assert len(cache.read_text().splitlines()) == 8
    # the same round again (another run directory, the first run's cache): zero calls, same selections
    CALLS.clear()
    again = _run(tmp_path, "b", f"reasoner.cache_dir={tmp_path / 'a' / 'reasoner_cache'}")
    assert CALLS == []
    assert [(r["reasoner/cache_hits"], r["reasoner/cache_misses"], r["reasoner/calls"]) for r in again] == [
        (4, 0, 0), (4, 0, 0)]
    assert _kept(again) == _kept(first)
    # resumed after step 1 (the step-2 checkpoint lost, as after a kill): step 2 is answered from disk
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("*[0-9]"))
    assert len(ckpts) == 2
    shutil.rmtree(ckpts[-1])
    (tmp_path / "a" / "checkpoints" / "latest").unlink(missing_ok=True)
    resumed = _run(tmp_path, "a", "resume=auto", "save_steps=1")
    assert CALLS == []
    assert _kept(resumed)[-1] == _kept(first)[-1] and resumed[-1]["reasoner/cache_hits"] == 4
