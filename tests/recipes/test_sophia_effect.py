"""Effect check for SOPHIA (slow): selection by propagated caption reward picks the captions
that state what the question needs, and training on the selected solutions raises the
VLM's held-out accuracy over its start and leaves it higher than a control arm that trains
on UNSELECTED solutions.

Setup (CPU, seed 0): the start is a briefly SFT-trained tiny VLM (`vlreason train sft`,
90 steps of 16 rows at lr 2e-3 on 512 colour rows, as in the GRPO effect check in
tests/recipes/test_effects.py), so it knows the format and mostly the colour but is far
below the ceiling when sampled; the bundled warm checkpoint is not used (it is near the
ceiling on colour and left no room to rise). It is both the captioner and the student.
Data: the synthetic colour task ("What colour is the shape?"), 32 training rows, 64 fresh
held-out rows. The reasoner is scripted: it sees only the caption and the question and
answers the first colour word the caption states, or "unknown" when it states none, so it
is correct exactly when the caption states the shape's true colour (its solution uses the
demo data's words). One round: K=4 captions per row sampled at temperature 1.5 (so that
some captions are wrong), N=2 solutions per caption, the selected solutions trained for
16 steps of 8 rows at lr 1e-3.

Control: the same round directory, trained by the same recipe from the same start with
the same seed (the recipe reuses a round on disk) for the same steps, but on UNSELECTED
solutions: one per row that has a caption with R(c) <= threshold (the first solution of
the first such caption).

Asserted: the propagated caption reward is 1 exactly for the captions that state the
row's colour (0 otherwise); every kept solution comes from such a caption; and after the
update the method arm's held-out accuracy (4 samples per row at temperature 1) is at
least 0.10 above the start and at least 0.20 above the control arm's.

Measured (2 busy CPU cores, 60-75 s per run; seed 0 is the asserted run, seeds 1 and 2
via SOPHIA_EFFECT_SEED, which seeds the SFT start and both arms alike), sampled accuracy:
  seed 0: start 0.340, method 0.551, control 0.094 (rise 0.211, margin 0.457)
  seed 1: start 0.281, method 0.535, control 0.043 (rise 0.254, margin 0.492)
  seed 2: start 0.242, method 0.438, control 0.051 (rise 0.195, margin 0.387)
15/32 rows kept in each; every row has an unselected caption (32 control rows). What
rises is the sampled accuracy: greedy accuracy stays about where it starts (seed 0:
start 0.969, method 0.938, control 0.266), i.e. training on the selected solutions
sharpens the answer distribution towards the right colour, while training on unselected
ones ("unknown" or a wrong colour) wrecks it. With 8 steps instead of 16 the rises were
0.145 / 0.125 / 0.102 (seeds 0/1/2). The earlier version, from the warm checkpoint at lr
3e-4, gave start 0.934, method 0.879, control 0.719: above the control but below its start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from recipes.sophia import SophiaRecipe
from vlreason.cli import main
from vlreason.data.schema import load_canonical, save_canonical
from vlreason.recipe_base import run_recipe

SFT_STEPS = 90  # the start: briefly SFT-trained, well below the ceiling when sampled
SOPHIA_STEPS = 16
SOPHIA_LR = "1e-3"
SEED = int(os.environ.get("SOPHIA_EFFECT_SEED", 0))  # the asserted numbers are seed 0's

COLOURS = ("red", "green", "blue", "yellow")
_COLOUR = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)
_SHAPE = re.compile(r"\b(circle|square|triangle|diamond)\b", re.IGNORECASE)
_CAPTION = re.compile(r"here is a description of it:\n(.*?)\n\nQuestion:", re.DOTALL)


class CaptionReader:
    """A text reasoner that can only read: the first colour the caption states, else
    "unknown" (never the row's answer, which it does not see); it writes its solution in the
    demo data's words (the warm VLM's own format), with the first shape word it read."""

    def solve(self, prompts, n, max_new_tokens, temperature, seed):
        out = []
        for p in prompts:
            caption = _CAPTION.search(p).group(1)
            m = _COLOUR.search(caption)
            colour = m.group(1).lower() if m else "unknown"
            s = _SHAPE.search(caption)
            shape = s.group(1).lower() if s else "shape"
            think = f"I see one shape. It is a {colour} {shape}." if m else "I see one shape. I cannot tell its colour."
            out.append([f"<think>{think}</think><answer>{colour}</answer>"] * n)
        return out


def caption_reader(cfg) -> CaptionReader:
    return CaptionReader()


class NoReasoner:
    def solve(self, *args, **kwargs):
        raise AssertionError("the control arm must reuse the round on disk, not ask a reasoner")


def no_reasoner(cfg) -> NoReasoner:
    return NoReasoner()


def _accuracy(model_dir, data, **overrides) -> float:
    from vlreason.evaluation import EvalConfig, evaluate
    from vlreason.models.loading import ModelConfig
    from vlreason.rollout.policy import Policy, RolloutConfig

    policy = Policy.load(ModelConfig(name_or_path=str(model_dir)), RolloutConfig())
    summary, _ = evaluate(policy, load_canonical(data), EvalConfig(max_new_tokens=40, **overrides))
    return summary["accuracy"]


def _states(caption: str, colour: str) -> bool:
    m = _COLOUR.search(caption)
    return bool(m) and m.group(1).lower() == colour


@pytest.mark.slow
def test_selected_captions_state_the_fact_and_training_on_them_beats_unselected(tmp_path):
    from data_pipelines.synthetic import build_dataset

    train = build_dataset("color", 32, 0, tmp_path / "train")
    heldout = build_dataset("color", 64, 99, tmp_path / "heldout")
    # the start: a briefly SFT-trained tiny VLM (well below the ceiling on colour when sampled)
    t0 = time.monotonic()
    sft_rows = build_dataset("color", 512, 2, tmp_path / "sft_rows")
    sft = tmp_path / "sft"
    assert main(["train", "sft", f"output_dir={sft}", f"data.train={sft_rows}", f"max_steps={SFT_STEPS}",
                 "optim.lr=2e-3", "optim.warmup_steps=10", "prompts_per_step=16", "sft.micro_batch_prompts=16",
                 "progress=false", f"seed={SEED}"]) == 0
    t_sft = time.monotonic() - t0
    common = [f"data.train={train}", f"model.name_or_path={sft / 'final'}", f"seed={SEED}", "progress=false",
              "trackers=[jsonl]", "sophia.warmup_steps=0",
              "sophia.rounds=1", "sophia.rows_per_round=32", "prompts_per_step=8",
              f"sophia.steps_per_round={SOPHIA_STEPS}", "sophia.num_captions=4", "sophia.num_solutions=2",
              "sophia.caption_max_new_tokens=32", "sophia.caption_temperature=1.5", f"optim.lr={SOPHIA_LR}",
              "reasoner.kind=python"]
    method = tmp_path / "method"
    run_recipe(SophiaRecipe, None, [*common, f"output_dir={method}", f"reasoner.path={__name__}:caption_reader"])

    # selection: the propagated caption reward is 1 exactly for captions stating the colour
    rnd = method / "rounds" / "round-000"
    collected = [json.loads(x) for x in (rnd / "collected.jsonl").read_text().splitlines()]
    assert len(collected) == 32
    states = [[_states(c, rec["answer"]) for c in rec["captions"]] for rec in collected]
    assert [[float(s) for s in ss] for ss in states] == [rec["caption_rewards"] for rec in collected]
    for rec, ss in zip(collected, states):
        assert (rec["kept"] is not None) == any(ss)
        if rec["kept"] is not None:
            assert ss[rec["kept_caption"]] and rec["caption_rewards"][rec["kept_caption"]] > 0.75
    kept = sum(rec["kept"] is not None for rec in collected)
    unselected = sum(not all(ss) for ss in states)
    assert kept >= 8 and unselected >= 8, f"{kept} rows kept, {unselected} with an unselected caption: too few"

    # control: the same round, trained the same way, on unselected solutions (one per row
    # that has a caption with R(c) <= threshold: the first solution of the first such caption)
    control = tmp_path / "control"
    shutil.copytree(rnd, control / "rounds" / "round-000")
    rows_by_id = {row["id"]: dict(row) for row in load_canonical(train)}
    rows = []
    for rec in collected:
        bad = [k for k, r in enumerate(rec["caption_rewards"]) if r <= 0.75]
        if bad:
            rows.append({**rows_by_id[rec["id"]], "solution": rec["solutions"][bad[0]][0]})
    assert len(rows) == unselected
    shutil.rmtree(control / "rounds" / "round-000" / "kept")
    save_canonical(rows, control / "rounds" / "round-000" / "kept")
    run_recipe(SophiaRecipe, None, [*common, f"output_dir={control}", f"reasoner.path={__name__}:no_reasoner"])

    # held-out accuracy, 4 samples per row at temperature 1, and greedy
    t1 = time.monotonic()
    sampled = {"temperature": 1.0, "num_samples": 4}
    arms = {"start": sft / "final", "method": method / "final", "control": control / "final"}
    acc = {k: _accuracy(m, heldout, **sampled) for k, m in arms.items()}
    greedy = {k: _accuracy(m, heldout) for k, m in arms.items()}
    start, after, ctrl = acc["start"], acc["method"], acc["control"]
    print(f"\nSOPHIA effect: {kept}/32 rows kept, {unselected} with an unselected caption, {len(rows)} control rows; "
          f"held-out sampled accuracy: start {start:.3f}, method {after:.3f}, control (unselected) {ctrl:.3f}; "
          f"rise {after - start:.3f}, margin {after - ctrl:.3f}; greedy {greedy}; "
          f"sft {t_sft:.0f} s, sophia arms {t1 - t0 - t_sft:.0f} s, eval {time.monotonic() - t1:.0f} s")
    assert after >= start + 0.10, (start, after)
    assert after >= ctrl + 0.20, (after, ctrl)
