"""The SOPHIA recipe: selection (caption reward, threshold, shortest correct, ties), one
step with a scripted reasoner (caption prompts hide the question, reasoner prompts hold
caption + question, the update batch is exactly the kept solution on the ORIGINAL
prompt), runs through run_recipe (nothing kept: loss 0 and no parameter moves; something
kept: the language model moves, the frozen vision tower does not), and the embedded
default (warm tiny VLM + tiny random text reasoner) end to end.

Runs go through ``vlreason.recipe_base.run_recipe`` (the CLI registry entry is added
separately). The scripted reasoner is injected with ``reasoner.kind=python``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recipes.sophia import REWARDS, SophiaRecipe, select_solutions
from vlreason.config import ConfigError, load_config, to_dict
from vlreason.data.schema import canonical_row, save_canonical
from vlreason.paths import warm_model
from vlreason.recipe_base import run_recipe
from vlreason.train.metrics import StepTimer

CHUNKED = ["sophia.rounds=0", "sophia.warmup_steps=0", "sophia.rows_per_round=0"]  # one update per collected step
FAST = [*CHUNKED, "sophia.num_captions=2", "sophia.num_solutions=4", "sophia.caption_max_new_tokens=8",
        "progress=false", "trackers=[jsonl]", "keep_last=0", "optim.lr=1e-3"]

# question -> answer; questions are unique so the scripted reasoner can grade itself
ANSWERS = {"What colour is shape one?": "red", "What colour is shape two?": "blue",
           "What colour is shape three?": "green"}
SOLVABLE = {"What colour is shape one?", "What colour is shape two?"}


def _solution(think: int, answer: str) -> str:
    return f"<think>{' '.join(['look'] * think)}</think><answer>{answer}</answer>"


def expected_kept(question: str) -> str | None:
    return _solution(2, ANSWERS[question]) if question in SOLVABLE else None


class ScriptedReasoner:
    """Caption 0 of a solvable row: 4 correct solutions (shortest: think length 2, twice:
    the first wins); caption 1: 2 of 4 correct (R(c) = 0.5 <= 0.75), one of them the
    shortest correct of all, which must NOT be kept; unsolvable rows: all wrong."""

    def __init__(self):
        self.prompts: list[str] = []

    def solve(self, prompts, n, max_new_tokens, temperature, seed):
        assert n == 4
        self.prompts += prompts
        seen: dict[str, int] = {}
        out = []
        for p in prompts:
            q = next(q for q in ANSWERS if q in p)
            k = seen[q] = seen.get(q, -1) + 1
            a = ANSWERS[q]
            if q not in SOLVABLE:
                out.append([_solution(1, "purple")] * 4)
            elif k == 0:
                out.append([_solution(6, a), _solution(2, a), _solution(4, a), _solution(2, a)])
            else:
                out.append([_solution(0, a), _solution(1, "purple"), _solution(1, "purple"), _solution(3, a)])
        return out


LAST: list[ScriptedReasoner] = []


def scripted_reasoner(cfg) -> ScriptedReasoner:
    LAST.append(ScriptedReasoner())
    return LAST[-1]


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (84, 84), color).save(buf, "PNG")
    return buf.getvalue()


def _data(tmp_path: Path, questions) -> Path:
    rows = [canonical_row(id=f"r{i}", images=[_png(ANSWERS[q])], question=q, answer=ANSWERS[q],
                          source="test") for i, q in enumerate(questions)]
    return save_canonical(rows, tmp_path / f"data{len(list(tmp_path.iterdir()))}")


def _scripted(data: Path, *overrides: str) -> list[str]:
    return [f"data.train={data}", "reasoner.kind=python", f"reasoner.path={__name__}:scripted_reasoner",
            *FAST, *overrides]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_shipped_config_is_the_embedded_default_and_bad_values_are_refused():
    cls = SophiaRecipe.config_class
    shipped = Path(__file__).parents[2] / "recipes" / "configs" / "sophia.yaml"
    assert to_dict(load_config(cls, shipped)) == to_dict(load_config(cls))
    cfg = load_config(cls)
    assert (cfg.sophia.threshold, cfg.model.freeze_vision, cfg.reasoner.kind) == (0.75, True, "transformers")
    assert load_config(cls, None, [*CHUNKED, "sophia.rows_per_round=10", "prompts_per_step=4"]).max_steps == 3
    # rounds (the default) set max_steps = warmup_steps + rounds x steps_per_round, whatever max_steps says
    assert load_config(cls, None, ["max_steps=99", "sophia.rounds=3", "sophia.steps_per_round=5",
                                   "sophia.warmup_steps=1"]).max_steps == 16
    for bad in ("sophia.threshold=1.0", "sophia.reward=f1", "sophia.num_captions=0", "reasoner.kind=vllm",
                "reasoner.kind=openai", "sophia.solution_template=no fields"):
        with pytest.raises((ConfigError, ValueError)):
            load_config(cls, None, [bad])


def test_select_solutions_threshold_correctness_shortest_and_ties():
    sols = [["aaaa", "bb", "cc", "d"], ["e", "ff", "g", "hhh"], ["i", "j", "k", "l"]]
    rewards = [[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]]
    sel = select_solutions(rewards, sols, threshold=0.75)
    assert sel.caption_rewards == [0.75, 0.5, 1.0]
    # caption 0 has R(c) = 0.75, not > 0.75; caption 1 is below; caption 2: all length 1, first wins
    assert (sel.kept, sel.kept_caption, sel.kept_solution) == ("i", 2, 0)
    sel = select_solutions([[1, 1, 1, 1], [1, 1, 1, 1]], [["xxx", "yy", "zz", "yyyy"], ["qq", "r", "ss", "t"]],
                           threshold=0.75)
    assert (sel.kept, sel.kept_caption, sel.kept_solution) == ("r", 1, 1)  # the shortest over captions
    sel = select_solutions([[1, 1, 1, 0]] * 2, [["a", "b", "c", "d"]] * 2, threshold=0.5)
    assert sel.kept == "a"
    none = select_solutions([[0, 0], [1, 0]], [["a", "b"], ["c", "d"]], threshold=0.75)
    assert none.kept is None and none.caption_rewards == [0.0, 0.5]
    # the length is the caller's (the recipe counts policy-tokenizer tokens)
    assert select_solutions([[1, 1]], [["ab", "xyz"]], threshold=0.5, length=lambda t: -len(t)).kept == "xyz"


def test_one_step_trains_on_exactly_the_kept_solution_of_the_original_prompt(tmp_path):
    questions = list(ANSWERS)  # two solvable rows, one not
    data = _data(tmp_path, questions)
    cfg = load_config(SophiaRecipe.config_class, None,
                      _scripted(data, f"output_dir={tmp_path / 'run'}", "prompts_per_step=3",
                                "sophia.micro_batch_prompts=1"))
    cfg.model.name_or_path = str(warm_model())
    recipe = SophiaRecipe(cfg)
    recipe.setup()
    seen_prompts = []
    sample = recipe.policy.sample

    def spy(prompts, **kw):
        seen_prompts.append(recipe.policy.processor.tokenizer.batch_decode(prompts.input_ids_PT))
        return sample(prompts, **kw)

    recipe.policy.sample = spy
    micro, metrics = recipe.prepare(0, StepTimer())
    # captions: K per row, from a prompt that does not show the question
    assert len(seen_prompts) == 1 and len(seen_prompts[0]) == 3
    assert all("Describe the image" in p and "shape" not in p for p in seen_prompts[0])
    # reasoning: one prompt per caption, with the caption slot filled and the question shown
    reasoner = LAST[-1]
    assert len(reasoner.prompts) == 6
    assert all("description of it" in p and "Question: " in p for p in reasoner.prompts)
    # the update: one micro-batch per kept row, the kept text on the row's own prompt
    tok = recipe.policy.processor.tokenizer
    got = {}
    for mb in micro:
        (row,) = mb.prompts.rows
        assert row["question"] in SOLVABLE
        ids = mb.completion_ids_NT[0][mb.completion_mask_NT[0].bool()]
        got[row["question"]] = tok.decode(ids)
        assert mb.texts == [expected_kept(row["question"])]
    assert got == {q: expected_kept(q) + "<|im_end|>" for q in SOLVABLE}
    assert metrics["sophia/kept_rows"] == 2 and metrics["sophia/kept_rows_total"] == 2
    assert metrics["sophia/caption_reward"] == pytest.approx((1.0 + 0.5 + 1.0 + 0.5 + 0 + 0) / 6)
    assert metrics["sophia/captions_above_threshold"] == pytest.approx(2 / 6)
    # micro-batch losses add up to the token-mean NLL over all kept tokens
    total = sum(float(recipe.step(mb)[0].detach()) for mb in micro)
    nll_sum = 0.0
    for mb in micro:
        with torch.no_grad():
            out = recipe.policy.token_outputs(mb)
        nll_sum += float(-(out.logprobs_NT * mb.completion_mask_NT).sum())
    assert total == pytest.approx(nll_sum / metrics["sophia/kept_tokens"], rel=1e-4)
    recipe.cleanup()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_runs_move_parameters_only_when_something_is_kept(tmp_path):
    base = _weights(warm_model())
    # nothing solvable: every step has loss 0 and no update
    none = run_recipe(SophiaRecipe, None, _scripted(_data(tmp_path, ["What colour is shape three?"] * 2),
                                                    f"output_dir={tmp_path / 'none'}", "max_steps=2",
                                                    "prompts_per_step=2"))
    records = _metrics(tmp_path / "none")
    assert [r["sophia/kept_rows"] for r in records] == [0, 0] and all(r["loss"] == 0.0 for r in records)
    after = _weights(none)
    assert all(torch.equal(base[k], after[k]) for k in base)
    # solvable rows: the language model and projector move, the frozen vision tower does not
    kept = run_recipe(SophiaRecipe, None, _scripted(_data(tmp_path, sorted(SOLVABLE)),
                                                    f"output_dir={tmp_path / 'kept'}", "max_steps=1",
                                                    "prompts_per_step=2"))
    (rec,) = _metrics(tmp_path / "kept")
    assert rec["sophia/kept_rows"] == 2 and rec["loss"] > 0 and rec["nll"] > 0
    after = _weights(kept)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    tower = [k for k in base if k.startswith(("visual.blocks", "visual.patch_embed"))]
    assert changed and tower and not changed & set(tower)  # the projector (visual.merger) trains


def test_select_solutions_never_keeps_malformed_or_over_long_solutions():
    good = [[1, 1, 1, 1]]
    # the shortest correct one is malformed: the next shortest well-formed one is kept
    sel = select_solutions(good, [["<w>", "a", "<ww>", "<www>"]], threshold=0.75,
                           well_formed=lambda t: t.startswith("<"))
    assert (sel.kept, sel.rejected) == ("<w>", None)
    sel = select_solutions(good, [["a", "b", "c", "d"]], threshold=0.75, well_formed=lambda t: False)
    assert (sel.kept, sel.rejected) == (None, "malformed")
    # over the limit: rejected, not cut; what fits is kept
    sel = select_solutions(good, [["aaaa", "bbbbb", "cccccc", "ddd"]], threshold=0.75, max_length=2)
    assert (sel.kept, sel.rejected) == (None, "too_long")
    assert select_solutions(good, [["aaaa", "bbbbb", "cc", "ddd"]], threshold=0.75, max_length=2).kept == "cc"
    # nothing correct under a good caption: nothing to reject
    assert select_solutions([[1, 0, 0, 0]], [["a"] * 4], threshold=0.75, max_length=0).rejected is None


# questions with <image> markers; what the (python) reasoner writes for each
STYLED = {
    # QwQ / R1 through a template that opened <think>: only "...</think>", as a user's reasoner may return it
    "<image>\nWhat colour is shape one?": ["I look.\n</think>\n\n<answer>red</answer>",
                                            "I look at it very closely.</think><answer>red</answer>"] * 2,
    # correct, but no think block at all
    "What colour is shape two?": ["<answer>blue</answer>"] * 4,
    # correct and well formed, but longer than sophia.max_target_tokens (default 512)
    "Look at <image> now. What colour is shape three?": [_solution(800 + k, "green") for k in range(4)],
}
STYLED_ANSWERS = {"<image>\nWhat colour is shape one?": "red", "What colour is shape two?": "blue",
                  "Look at <image> now. What colour is shape three?": "green"}


class StyledReasoner:
    def __init__(self):
        self.prompts: list[str] = []

    def solve(self, prompts, n, max_new_tokens, temperature, seed):
        self.prompts += prompts
        return [next(STYLED[q] for q in STYLED if q.split("What")[-1] in p)[:n] for p in prompts]


def styled_reasoner(cfg) -> StyledReasoner:
    LAST.append(StyledReasoner())
    return LAST[-1]


def test_solutions_are_normalised_long_ones_rejected_and_image_markers_stripped(tmp_path):
    rows = [canonical_row(id=f"r{i}", images=[_png(a)], question=q, answer=a, source="test")
            for i, (q, a) in enumerate(STYLED_ANSWERS.items())]
    data = save_canonical(rows, tmp_path / "styled")
    cfg = load_config(SophiaRecipe.config_class, None,
                      [f"data.train={data}", "reasoner.kind=python", f"reasoner.path={__name__}:styled_reasoner",
                       *FAST, f"output_dir={tmp_path / 'run'}", "prompts_per_step=3", "sophia.reward=hard"])
    cfg.model.name_or_path = str(warm_model())
    recipe = SophiaRecipe(cfg)
    recipe.setup()
    tok = recipe.policy.processor.tokenizer
    assert len(tok(STYLED["Look at <image> now. What colour is shape three?"][0])["input_ids"]) > 512
    for step, reward in enumerate(("hard", "accuracy")):
        recipe.reward_fn = REWARDS[reward]
        micro, metrics = recipe.prepare(step, StepTimer())
        (mb,) = micro
        # the template-opened solution is trained on, well formed; the hard reward accepted it
        assert [r["id"] for r in mb.prompts.rows] == ["r0"]
        assert mb.texts == ["<think>I look.\n</think>\n\n<answer>red</answer>"]
        assert not mb.truncated_N.any()
        assert tok.decode(mb.completion_ids_NT[0][mb.completion_mask_NT[0].bool()]).endswith(
            "</answer><|im_end|>")
        # the long correct solutions are rejected, not cut; answer-only ones are correct
        # under accuracy but never trained on
        assert metrics["sophia/kept_rows"] == 1 and metrics["sophia/kept_too_long"] == 1
        assert metrics["sophia/kept_malformed"] == (1 if reward == "accuracy" else 0)
        assert metrics["sophia/solution_format"] == pytest.approx(2 / 3)
    # the reasoner never sees the image markers
    prompts = LAST[-1].prompts
    assert len(prompts) == 12 and not any("<image>" in p for p in prompts)
    assert any("Question: Look at now. What colour is shape three?" in p for p in prompts)
    assert any("Question: What colour is shape one?" in p for p in prompts)
    recipe.cleanup()
