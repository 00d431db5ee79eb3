"""Easy/hard routing between two reasoners: rows whose difficulty (a row field or a key of
the row's JSON meta) is in sophia.hard_values go to reasoner_hard, the others to
reasoner; solutions come back in row order, each reasoner with its own cache. With
sophia.route_by=pass_rate the VLM's own pass rate on the question decides."""

from __future__ import annotations

import io

from PIL import Image

from recipes.sophia import SophiaRecipe
from vlreason.config import load_config
from vlreason.data.schema import canonical_row, save_canonical
from vlreason.paths import warm_model
from vlreason.train.metrics import StepTimer

ANSWERS = {"What colour is shape one?": "red", "What colour is shape two?": "blue",
           "What colour is shape three?": "green"}
PROMPTS: dict[str, list[str]] = {"easy": [], "hard": []}


class Tagged:
    def __init__(self, tag):
        self.tag = tag

    def solve(self, prompts, n, max_new_tokens, temperature, seed):
        PROMPTS[self.tag] += prompts
        return [[f"<think>{self.tag}</think><answer>{ANSWERS[next(q for q in ANSWERS if q in p)]}</answer>"] * n
                for p in prompts]


def easy(cfg):
    return Tagged("easy")


def hard(cfg):
    return Tagged("hard")


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (84, 84), color).save(buf, "PNG")
    return buf.getvalue()


def _routed_recipe(tmp_path, rows, *overrides: str) -> SophiaRecipe:
    """A set-up SOPHIA recipe over ``rows`` (one step of all 3, no rounds), routing
    between the ``easy`` and ``hard`` reasoners above; their prompt logs emptied."""
    data = save_canonical(rows, tmp_path / "data")
    cfg = load_config(SophiaRecipe.config_class, None, [
        f"data.train={data}", f"output_dir={tmp_path / 'run'}", "prompts_per_step=3",
        "sophia.rounds=0", "sophia.warmup_steps=0", "sophia.rows_per_round=0",
        "sophia.num_captions=2", "sophia.num_solutions=2", "sophia.caption_max_new_tokens=8",
        *overrides,
        "reasoner.kind=python", f"reasoner.path={__name__}:easy",
        "reasoner_hard.kind=python", f"reasoner_hard.path={__name__}:hard"])
    cfg.model.name_or_path = str(warm_model())
    recipe = SophiaRecipe(cfg)
    recipe.setup()
    PROMPTS["easy"].clear()
    PROMPTS["hard"].clear()
    return recipe


def test_hard_rows_go_to_the_hard_reasoner(tmp_path):
    metas = [{"difficulty": "Hard"}, {"difficulty": "easy"}, None]
    rows = [canonical_row(id=f"r{i}", images=[_png(a)], question=q, answer=a, source="test", meta=m)
            for i, ((q, a), m) in enumerate(zip(ANSWERS.items(), metas))]
    recipe = _routed_recipe(tmp_path, rows)
    micro, metrics = recipe.prepare(0, StepTimer())
    assert len(PROMPTS["hard"]) == 2 and all("shape one" in p for p in PROMPTS["hard"])
    assert len(PROMPTS["easy"]) == 4 and not any("shape one" in p for p in PROMPTS["easy"])
    kept = {row["id"]: text for mb in micro for row, text in zip(mb.prompts.rows, mb.texts)}
    assert kept == {"r0": "<think>hard</think><answer>red</answer>", "r1": "<think>easy</think><answer>blue</answer>",
                    "r2": "<think>easy</think><answer>green</answer>"}
    assert metrics["sophia/hard_prompts"] == 2 and metrics["sophia/kept_rows"] == 3
    assert (metrics["reasoner/cache_misses"], metrics["reasoner_hard/cache_misses"]) == (4, 2)
    assert (tmp_path / "run" / "reasoner_hard" / "reasoner_cache" / "calls-rank0.jsonl").is_file()
    recipe.cleanup()


def test_route_by_the_vlms_own_pass_rate(tmp_path):
    """sophia.route_by=pass_rate: the VLM answers each original question 4 times; rows it
    gets right less than half the time go to the hard reasoner. A row whose answer the VLM
    never says ("purple") has pass rate 0 and must go there."""
    answers = {"What colour is shape one?": "red", "What colour is shape two?": "blue",
               "What colour is shape three?": "purple"}
    rows = [canonical_row(id=f"r{i}", images=[_png(a if a != "purple" else "green")], question=q, answer=a,
                          source="test") for i, (q, a) in enumerate(answers.items())]
    recipe = _routed_recipe(tmp_path, rows, "sophia.route_by=pass_rate", "sophia.pass_rate_samples=4",
                            "sophia.hard_below=0.5")
    _, metrics = recipe.prepare(0, StepTimer())
    rates = dict(zip((r["question"] for r in recipe.last_rows), recipe.last_pass_rates))
    assert set(rates) == set(answers) and rates["What colour is shape three?"] == 0.0
    assert all(r in (0.0, 0.25, 0.5, 0.75, 1.0) for r in rates.values())
    hard_q = {q for q, r in rates.items() if r < 0.5}
    assert len(PROMPTS["hard"]) == 2 * len(hard_q) and len(PROMPTS["easy"]) == 2 * (3 - len(hard_q))
    assert all(any(q in p for q in hard_q) for p in PROMPTS["hard"])
    assert not any(any(q in p for q in hard_q) for p in PROMPTS["easy"])
    assert metrics["sophia/hard_prompts"] == 2 * len(hard_q)
    assert abs(metrics["sophia/vlm_pass_rate"] - sum(rates.values()) / 3) < 1e-9
    recipe.cleanup()
