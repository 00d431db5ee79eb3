"""Effect checks: each method changes what its paper says it changes, against a control arm
that starts from the same checkpoint with the same seed and differs only in the method's
ingredient. CPU, tiny model, synthetic colour task (what a tiny random Qwen-VL can learn
to perceive; position it cannot). Each check prints the method arm's and the control
arm's metrics.

GRPO (1 seed, seed 0): after 90 SFT steps on 512 colour rows, 60 GRPO steps (G=8, 8
prompts a step, lr 3e-4) with the real reward (0.1 format + 0.9 accuracy) against 60
identical steps whose accuracy part is replaced by a fair coin drawn for each completion
(same format signal, same reward scale, no information about the answer).
Held-out: 128 fresh rows, 4 samples each at temperature 1 (the temperature both arms
trained at) and greedy. Asserted: the method arm's sampled accuracy rises by at least
0.10 over the SFT start and beats the control arm's by at least 0.05; its greedy
accuracy rises by at least 0.03 (the start is already near 0.9 greedy).

Measured here (seed 0, commit fb8ed3c, 2-core CPU): start sampled 0.318 / greedy 0.898;
method 0.566 / 0.992; control 0.021 / 0.000 (with a noise reward GRPO's updates are a
random walk at this learning rate and the answer format breaks down). An earlier control
whose coin was keyed on the completion text scored 0.164 / 0.305 (the policy learns to
repeat texts that won a coin).

DVRP (seeds 0 and 1 measured): from the bundled warm tiny checkpoint, 16 steps on 256
colour rows (G=8, 4 prompts a step, 32 tokens, lr 3e-4, no reference KL) of DVRP against
16 steps of plain GRPO with the same settings and seed (the arms' resolved configs differ
only in the ``dvrp`` section). DVRP runs the paper's values except ``lambda_nec`` = 0.05,
5x the paper's 0.01: at 0.01 sixteen steps change nothing measurable (seed 0: held-out
KL(orig||mask) 0.345 against GRPO's 0.344, blank-image accuracy 0.271 in both), at 0.1
the full-image accuracy at temperature 1 fell by 0.18 at seed 1, at 1.0 the full-image
format broke (greedy 0.83). Held-out: 48 fresh colour rows; greedy accuracy with the image
and with it replaced by a black image of the same size; mean token KL(pi_orig || pi_mask)
on 2 completions a row sampled at T=1 from the original image, with DVRP's masked view
(p = 0.6, masks seeded apart from training). Asserted: the method's KL is at least twice
the control's, its blank-image accuracy at least 0.10 below the control's, and its
full-image accuracy at most 0.05 (2 of 48 rows) below the control's.
Measured by this test at commit 2a6e9c3 (2-core CPU, seed 0 as written, seed 1 with its
seed edited to 1): seed 0 method KL 1.915,
blank 0.000, full 0.979 (at T=1, measured by a prototype only: 0.906) against control 0.344, 0.271, 1.000 (0.938); seed 1
method 1.225, 0.000, 0.979 (0.849) against 0.450, 0.229, 1.000 (0.906). How the blind
accuracy falls: on this task a model that keeps its answer format scores about chance
(0.25) with a blank image whatever colour it names, so going below chance means leaving
the format; the DVRP model does exactly that on a black image (blank-image format rate
0.00 against GRPO's 1.00), i.e. it no longer produces an answer without the image, while
GRPO names a colour. It is not evidence of better perception of the image, which
this tiny model cannot show on a task it already answers (full-image greedy 1.0 at the
start).

PTST (seeds 0 and 1 measured): Vision-R1's RL stages from the bundled warm tiny checkpoint
(cold_start.steps=0; the warm checkpoint is SFT on the demo solutions, i.e. a cold-started
model) on the bundled demo data (mixed tasks; solutions 19-52 tokens) with the recipe's
tiny schedule, stage 1 24 tokens x G=8 for 24 steps then stage 2 48 x 4 for 24 steps,
against one stage of 48 x 4 for 48 steps (samples x length 192 in every step of both
arms; same seed, so the same prompts at each step). Lengths: the rollouts' mean over the
first and the last third (8 steps) of a stage, and the greedy held-out length on the 64
demo eval rows at one 64-token limit (the stage-end evaluations), so the stage-1 cap
cannot raise the stage-2 number by itself. Asserted: in stage 1 the truncated fraction
falls by at least 0.10 and the held-out length falls at least 2 tokens below the start's;
in stage 2 the held-out length grows again (strictly; no margin, seed 0's rise is small);
the final held-out greedy accuracy is at most 0.05 (3 of 64 rows) below the control's.
Measured by this test at commit 2a6e9c3 (seed 0 as written, seed 1 edited): start
accuracy 0.578, held-out length 27.95.
Seed 0: truncated 0.35 -> 0.17 in stage 1, rollout length 21.2 -> 20.3 (stage-2 last
third 22.6), held-out length 27.95 -> 21.86 -> 22.19, accuracy 0.531; control 0.500
(length 23.08, rollout 24.6 -> 24.2). Seed 1: truncated 0.31 -> 0.17, rollout 21.3 ->
20.7 (stage-2 last third 23.2), held-out 27.95 -> 20.78 -> 23.89, accuracy 0.516;
control 0.500 (23.45). Both arms end below the start's accuracy (0.578): RL on this
tiny model and data does not raise greedy accuracy; PTST's claim checked here is only
"not worse than one long stage". A smaller PTST run (12 + 12 steps, 4 prompts a step,
seed 0) showed the stage-1 fall but no regrowth (held-out length 21.5 -> 19.8).

Vision-OPD: tests/recipes/effects_opd.py (its design, margins and measured numbers are in
that module's docstring: teacher on the crop 0.828, student start 0.203, method 0.328,
control ``teacher.view=full`` 0.203; one seed), collected here.

Run time on the shared 2-core machine under a load average of about 10, with
OMP_NUM_THREADS=1, the two checks running side by side: DVRP 186 s and 336 s, PTST 327 s
and 461 s; not measured on an idle machine (the DVRP check does 16 GRPO + 16 DVRP steps
and 2 x 96 greedy answers, the PTST check 2 x 48 RL steps and 5 evaluations of 64 rows). With the default thread count the
same load made the PTST check about 10x slower (7 steps in 8 minutes).
"""

from __future__ import annotations

import textwrap

import pytest
from effects_opd import (  # noqa: F401  (same directory; collected as part of this module)
    test_vision_opd_crop_teacher_raises_full_image_accuracy_more_than_a_full_image_teacher,
)

from vlreason.cli import main

COIN_REWARD = '''
import random

from vlreason.rewards import format_reward

_coin = random.Random(0)  # one seeded stream: the same run draws the same coins


def coin_accuracy(completion, ground_truth, **info):
    """0.1 format + 0.9 x a fair coin drawn afresh for every completion: the accuracy
    part carries no information about the answer (nor about the text)."""
    return 0.1 * format_reward(completion) + 0.9 * float(_coin.random() < 0.5)
'''


def _accuracy(model_dir, data, **overrides) -> float:
    from vlreason.data.schema import load_canonical
    from vlreason.evaluation import EvalConfig, evaluate
    from vlreason.models.loading import ModelConfig
    from vlreason.rollout.policy import Policy, RolloutConfig

    policy = Policy.load(ModelConfig(name_or_path=str(model_dir)), RolloutConfig())
    summary, _ = evaluate(policy, load_canonical(data), EvalConfig(max_new_tokens=40, **overrides))
    return summary["accuracy"]


def _grpo(out, start, train, reward: str) -> None:
    assert main(["train", "grpo", f"output_dir={out}", f"model.name_or_path={start}",
                 f"data.train={train}", "max_steps=60", "save_steps=0", "rollout.num_generations=8",
                 "rollout.max_new_tokens=40", "prompts_per_step=8",
                 "algorithm.micro_batch_prompts=4", "optim.lr=3e-4", "progress=false",
                 "heldout_eval=false", f"algorithm.reward={reward}", "seed=0"]) == 0


@pytest.mark.slow
def test_grpo_raises_heldout_accuracy_where_an_uninformative_reward_does_not(tmp_path, monkeypatch):
    from data_pipelines.synthetic import build_dataset

    (tmp_path / "effect_rewards.py").write_text(textwrap.dedent(COIN_REWARD))
    monkeypatch.syspath_prepend(str(tmp_path))
    train = build_dataset("color", 512, 0, tmp_path / "train")
    heldout = build_dataset("color", 128, 99, tmp_path / "heldout")
    sft = tmp_path / "sft"
    assert main(["train", "sft", f"output_dir={sft}", f"data.train={train}", "max_steps=90",
                 "optim.lr=2e-3", "optim.warmup_steps=10", "prompts_per_step=16",
                 "sft.micro_batch_prompts=16", "progress=false"]) == 0
    _grpo(tmp_path / "grpo", sft / "final", train, "format_accuracy")
    _grpo(tmp_path / "control", sft / "final", train, "effect_rewards:coin_accuracy")

    sampled = {"temperature": 1.0, "num_samples": 4}
    start = {"sampled": _accuracy(sft / "final", heldout, **sampled), "greedy": _accuracy(sft / "final", heldout)}
    method = {"sampled": _accuracy(tmp_path / "grpo" / "final", heldout, **sampled),
              "greedy": _accuracy(tmp_path / "grpo" / "final", heldout)}
    control = {"sampled": _accuracy(tmp_path / "control" / "final", heldout, **sampled),
               "greedy": _accuracy(tmp_path / "control" / "final", heldout)}
    print(f"GRPO effect, held-out accuracy (sampled at T=1 / greedy): start {start}, "
          f"method {method}, control (coin-flip accuracy reward) {control}")
    assert method["sampled"] >= start["sampled"] + 0.10, (start, method)
    assert method["sampled"] >= control["sampled"] + 0.05, (method, control)
    assert method["greedy"] >= start["greedy"] + 0.03, (start, method)


# ---- DVRP -------------------------------------------------------------------------------------

DVRP_LAMBDA_NEC = 0.05  # 5x the paper's 0.01: 16 steps instead of a paper run (see the module docstring)


def _blanked(src, dst):
    """``src`` with every image replaced by a black image of the same size."""
    import io

    from PIL import Image

    from vlreason.data.schema import load_canonical, save_canonical

    def blank(row):
        out = []
        for data in row["images"]:
            buf = io.BytesIO()
            Image.new("RGB", Image.open(io.BytesIO(data)).size, (0, 0, 0)).save(buf, format="PNG")
            out.append(buf.getvalue())
        return {"images": out}

    return save_canonical(load_canonical(src).map(blank), dst)


def _view_metrics(model_dir, heldout, blank) -> dict[str, float]:
    """Greedy held-out accuracy with the image and with it blanked, and the mean token
    KL(pi_orig || pi_mask) on completions sampled from the original image (2 per row, T=1)
    with DVRP's masked view (p = 0.6, masks seeded apart from any training step's)."""
    import torch

    from vlreason.data.schema import load_canonical
    from vlreason.evaluation import EvalConfig, evaluate
    from vlreason.models.loading import ModelConfig
    from vlreason.rollout.policy import Policy, RolloutConfig
    from vlreason.rollout.prompts import decode_row_images
    from vlreason.rollout.views_forward import view_token_terms
    from vlreason.views.triplet import build_triplet

    policy = Policy.load(ModelConfig(name_or_path=str(model_dir)), RolloutConfig())
    full, _ = evaluate(policy, load_canonical(heldout), EvalConfig(max_new_tokens=32))
    blind, _ = evaluate(policy, load_canonical(blank), EvalConfig(max_new_tokens=32))
    rows, kl_sum, tokens = list(load_canonical(heldout)), 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            masked = [build_triplet(decode_row_images(row), budget=policy.budget,
                                    patch_size=policy.family.patch_size, mask_prob=0.6, seed=1234,
                                    row_index=start + k).masked for k, row in enumerate(chunk)]
            batch = policy.sample(policy.prompts(chunk), seed=7, num_generations=2, max_new_tokens=32)
            terms = view_token_terms(policy.model, policy.family, batch,
                                     {"masked": policy.prompts(chunk, images=masked)}, kl_method="full")
            mask = batch.completion_mask_NT.bool()
            kl_sum += float(terms.kl_NT["masked"][mask].sum())
            tokens += int(mask.sum())
    return {"full": full["accuracy"], "blank": blind["accuracy"], "blank_format": blind["format_rate"],
            "kl_mask": kl_sum / tokens}


@pytest.mark.slow
def test_dvrp_makes_answers_depend_on_the_image_where_grpo_does_not(tmp_path):
    from data_pipelines.synthetic import build_dataset
    from vlreason.paths import warm_model

    train = build_dataset("color", 256, 0, tmp_path / "train")
    heldout = build_dataset("color", 48, 99, tmp_path / "heldout")
    blank = _blanked(heldout, tmp_path / "blank")
    common = [f"model.name_or_path={warm_model()}", f"data.train={train}", "max_steps=16", "save_steps=0",
              "rollout.num_generations=8", "rollout.max_new_tokens=32", "prompts_per_step=4",
              "algorithm.micro_batch_prompts=4", "optim.lr=3e-4", "algorithm.kl_coef=0",
              "algorithm.reward=format_accuracy", "progress=false", "seed=0"]
    assert main(["train", "grpo", f"output_dir={tmp_path / 'grpo'}", "heldout_eval=false", *common]) == 0
    assert main(["train", "dvrp", f"output_dir={tmp_path / 'dvrp'}", f"dvrp.lambda_nec={DVRP_LAMBDA_NEC}",
                 *common]) == 0

    method = _view_metrics(tmp_path / "dvrp" / "final", heldout, blank)
    control = _view_metrics(tmp_path / "grpo" / "final", heldout, blank)
    print(f"DVRP effect, held-out (greedy accuracy with the image / blanked, blank-image format rate, "
          f"token KL(orig||mask)): method (DVRP) {method}, control (GRPO) {control}")
    assert method["kl_mask"] >= 2 * control["kl_mask"], (method, control)
    assert method["blank"] <= control["blank"] - 0.10, (method, control)
    assert method["full"] >= control["full"] - 0.05, (method, control)


# ---- PTST (Vision-R1) -------------------------------------------------------------------------

PTST_STAGES = ("ptst.stages=[{name: stage1, max_new_tokens: 24, num_generations: 8, steps: 24},"
               " {name: stage2, max_new_tokens: 48, num_generations: 4, steps: 24}]")
ONE_STAGE = "ptst.stages=[{name: single, max_new_tokens: 48, num_generations: 4, steps: 48}]"


def _vision_r1(out, seed: int, stages: str) -> tuple[list[dict], dict[str, dict]]:
    """(per-RL-step metrics, stage name -> held-out eval at that stage's end)."""
    import json

    from vlreason.paths import demo_data, warm_model

    assert main(["train", "vision_r1", f"output_dir={out}", f"model.name_or_path={warm_model()}",
                 f"data.train={demo_data('train')}", f"data.eval={demo_data('eval')}", "cold_start.steps=0",
                 "progress=false", f"seed={seed}", stages]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval_stages.jsonl").read_text().splitlines()]
    return [s for s in steps if "completion_len" in s], {e["stage"]: e for e in evals}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.slow
def test_ptst_shortens_then_relaxes_without_losing_accuracy_against_one_long_stage(tmp_path):
    from vlreason.data.schema import load_canonical
    from vlreason.evaluation import EvalConfig, evaluate
    from vlreason.models.loading import ModelConfig
    from vlreason.paths import demo_data, warm_model
    from vlreason.rollout.policy import Policy, RolloutConfig
    from vlreason.rollout.prompts import PromptConfig

    start_policy = Policy.load(ModelConfig(name_or_path=str(warm_model())),
                               RolloutConfig(prompt=PromptConfig(template_default_system=False)))
    start, _ = evaluate(start_policy, load_canonical(demo_data("eval")), EvalConfig())  # greedy, 64 tokens
    ptst_steps, ptst_eval = _vision_r1(tmp_path / "ptst", 0, PTST_STAGES)
    one_steps, one_eval = _vision_r1(tmp_path / "one", 0, ONE_STAGE)

    third = 8  # steps in a third of a stage
    s1, s2 = ptst_steps[:24], ptst_steps[24:]
    roll = {"stage1_first": _mean(s["completion_len"] for s in s1[:third]),
            "stage1_last": _mean(s["completion_len"] for s in s1[-third:]),
            "stage2_last": _mean(s["completion_len"] for s in s2[-third:]),
            "trunc_stage1_first": _mean(s["truncated_frac"] for s in s1[:third]),
            "trunc_stage1_last": _mean(s["truncated_frac"] for s in s1[-third:])}
    held = {"start": start["length_mean"], "stage1": ptst_eval["stage1"]["length_mean"],
            "stage2": ptst_eval["stage2"]["length_mean"]}
    method = {"accuracy": ptst_eval["stage2"]["accuracy"], "length": held["stage2"]}
    control = {"accuracy": one_eval["single"]["accuracy"], "length": one_eval["single"]["length_mean"],
               "rollout_len_first": _mean(s["completion_len"] for s in one_steps[:third]),
               "rollout_len_last": _mean(s["completion_len"] for s in one_steps[-third:])}
    print(f"PTST effect: start accuracy {start['accuracy']:.3f}; method (PTST 24x8 -> 48x4) rollout lengths "
          f"{roll}, held-out greedy lengths {held}, final {method}; control (one stage 48x4) {control}")
    # stage 1 suppresses: fewer completions hit the 24-token limit, the held-out answers get shorter
    assert roll["trunc_stage1_last"] <= roll["trunc_stage1_first"] - 0.10, roll
    assert held["stage1"] <= held["start"] - 2.0, held
    # final accuracy at least the control's, within 3 of the 64 held-out rows
    assert method["accuracy"] >= control["accuracy"] - 0.05, (method, control)
    # stage 2 relaxes: the held-out answers grow again (measured at one 64-token limit, so the
    # stage-1 cap cannot raise the stage-2 number by itself); no margin, see the module docstring
    assert held["stage2"] > held["stage1"], held
