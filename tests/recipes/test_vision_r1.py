"""The Vision-R1 recipe: its hard reward on hand-written completions, its config, a short
run through `vlreason train vision_r1` (stages, lengths, G, stage-end evaluation, the
cold-start model as KL reference, plot, `vlreason eval` on final/), SIGTERM inside stage 2
+ resume == an uninterrupted run, and (slow) a learning check on the synthetic colour task.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from vlreason.cli import main
from vlreason.config import load_config, to_dict
from vlreason.rewards import get_reward
from vlreason.rewards.combine import REWARDS, hard_format_and_correct

REPO = Path(__file__).parents[2]

# A short schedule for the tests: 3 cold-start steps, then 24 x 4 and 48 x 2 (budget 96).
SHORT = ["cold_start.steps=3", "cold_start.prompts_per_step=4", "cold_start.micro_batch_prompts=4",
         "ptst.stages=[{name: stage1, max_new_tokens: 24, num_generations: 4, steps: 2},"
         " {name: stage2, max_new_tokens: 48, num_generations: 2, steps: 2}]",
         "prompts_per_step=2", "algorithm.micro_batch_prompts=1",
         "eval.limit=4", "eval.max_new_tokens=24", "progress=false"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- the reward --------------------------------------------------------------------------

GOOD = "<think>I see one shape. It is a red circle.</think><answer>red</answer>"


@pytest.mark.parametrize("completion, truncated, info, expected", [
    (GOOD, False, {}, 1.0),                                                          # right
    ("<think>It is a red circle.</think>\n<answer> Red. </answer>", False, {}, 1.0),   # normalised
    ("<think>I see one shape. It is blue.</think><answer>blue</answer>", False, {}, 0.0),  # wrong
    ("<answer>red</answer>", False, {}, 0.0),                                         # no think
    ("<think>red</think>red", False, {}, 0.0),                                        # no answer tags
    (GOOD + " trailing text", False, {}, 0.0),                                        # text after
    (GOOD + "<answer>red</answer>", False, {}, 0.0),                                  # two answers
    ("<think></think><answer>red</answer>", False, {}, 0.0),                          # empty think
    (GOOD, True, {}, 0.0),                                                            # truncated
    ("<think>Option B is red.</think><answer>B</answer>", False, {"choices": ["blue", "red"]}, 1.0),
])
def test_hard_reward_on_hand_written_completions(completion, truncated, info, expected):
    answer = "B" if "choices" in info else "red"
    assert REWARDS["vision_r1"] is hard_format_and_correct
    assert hard_format_and_correct(completion, answer, truncated=truncated, **info) == expected


def test_grpo_scoring_passes_the_truncated_flag_to_the_reward():
    from vlreason.train.grpo import score

    rows = [{"id": "a", "answer": "red", "choices": []}]
    batch = SimpleNamespace(texts=[GOOD, GOOD], group_ids_N=torch.tensor([0, 0]),
                            truncated_N=torch.tensor([False, True]), prompts=SimpleNamespace(rows=rows))
    rewards, _ = score(get_reward("vision_r1"), batch)
    assert rewards.tolist() == [1.0, 0.0]


# ---- the config --------------------------------------------------------------------------

def test_defaults_follow_the_paper_and_resolve_the_schedule():
    from recipes.vision_r1 import VisionR1RecipeConfig

    cfg = load_config(VisionR1RecipeConfig)
    a = cfg.algorithm
    assert (a.reward, a.kl_coef, a.kl_estimator, a.advantage, a.clip_low) == ("vision_r1", 0.01, "k3", "grpo", 0.2)
    assert cfg.rollout.prompt.system_prompt == "" and cfg.rollout.prompt.template_default_system is False
    stages = cfg.ptst.stages
    assert [(s.max_new_tokens, s.num_generations) for s in stages] == [(24, 8), (48, 4)]
    assert cfg.max_steps == cfg.cold_start.steps + sum(s.steps for s in stages)  # 0 -> whole schedule
    assert load_config(VisionR1RecipeConfig, None, ["max_steps=5"]).max_steps == 5
    with pytest.raises(ValueError, match="schedule has"):
        load_config(VisionR1RecipeConfig, None, ["max_steps=100000"])
    with pytest.raises(ValueError, match="not constant"):
        load_config(VisionR1RecipeConfig, None, ["ptst.stages=[{name: a, max_new_tokens: 8, num_generations: 4, steps: 1},"
                                                 " {name: b, max_new_tokens: 8, num_generations: 2, steps: 1}]"])
    with pytest.warns(UserWarning, match="not constant"):
        load_config(VisionR1RecipeConfig, None, ["ptst.strict_budget=false",
                                                 "ptst.stages=[{name: a, max_new_tokens: 8, num_generations: 4, steps: 1},"
                                                 " {name: b, max_new_tokens: 8, num_generations: 2, steps: 1}]"])


def test_shipped_configs_match_the_default_and_the_paper():
    from recipes.vision_r1 import VisionR1RecipeConfig

    configs = REPO / "recipes" / "configs"
    assert to_dict(load_config(VisionR1RecipeConfig, configs / "vision_r1.yaml")) == to_dict(load_config(VisionR1RecipeConfig))
    paper = load_config(VisionR1RecipeConfig, configs / "vision_r1_paper.yaml")
    assert [(s.max_new_tokens, s.num_generations, s.steps) for s in paper.ptst.stages] == [(4096, 16, 100), (8192, 8, 100)]
    assert (paper.cold_start.lr, paper.cold_start.max_target_tokens, paper.algorithm.kl_coef) == (5e-6, 16384, 0.01)
    assert paper.rollout.prompt.system_prompt == "" and paper.rollout.prompt.template_default_system is False
    for line in (configs / "vision_r1_paper.yaml").read_text().splitlines():  # a source on every number/switch
        value = line.split("#")[0].partition(":")[2].strip()
        if value in ("true", "false") or value.replace(".", "").replace("e-", "").isdigit():
            assert "[" in line.partition("#")[2], f"no source: {line}"


# A ChatML template that, like the Qwen2-VL and Qwen2.5-VL ones, puts a default system turn in
# front of a conversation that has none (the tiny model's own template does not).
DEFAULT_SYSTEM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_no_system_prompt_means_no_system_turn_with_a_qwen2_style_template():
    from recipes.vision_r1 import VisionR1RecipeConfig
    from vlreason.data.schema import load_canonical
    from vlreason.models.loading import load_processor
    from vlreason.models.tiny import tiny_model_path
    from vlreason.paths import demo_data
    from vlreason.rollout.prompts import PromptConfig, build_prompt_batch
    from vlreason.views.budget import PixelBudget

    processor = load_processor(tiny_model_path())
    processor.chat_template = DEFAULT_SYSTEM_TEMPLATE
    row = load_canonical(demo_data("train"))[0]
    budget = PixelBudget(min_pixels=3136, max_pixels=12544, factor=28)

    def rendered(cfg: PromptConfig) -> str:
        ids = build_prompt_batch([row], processor, budget, cfg).input_ids_PT[0]
        return processor.tokenizer.decode(ids, skip_special_tokens=False)

    vision_r1 = load_config(VisionR1RecipeConfig).rollout.prompt
    text = rendered(vision_r1)
    assert "system" not in text and "helpful assistant" not in text
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith("<|im_start|>assistant\n")
    assert row["question"] in text
    # control: an empty system prompt that keeps the template's default gets its system turn
    kept = rendered(PromptConfig(system_prompt="", template_default_system=True))
    assert kept.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert kept.endswith(text)
    # a system prompt of ours is the only system turn, whatever the flag says
    ours = rendered(PromptConfig(system_prompt="Think first.", template_default_system=False))
    assert ours.startswith("<|im_start|>system\nThink first.<|im_end|>\n") and ours.count("system") == 1


def test_each_rl_step_hands_its_stage_length_to_grpo():
    # GRPOPhases uses the max_new_tokens it is given as the Dr.GRPO constant
    # (tests/train/test_grpo_dapo.py::test_drgrpo_constant_is_the_rollouts_own_length_limit)
    from recipes.vision_r1 import VisionR1Recipe, tiny_stages

    recipe = VisionR1Recipe.__new__(VisionR1Recipe)
    recipe.cold_steps, recipe.stages, recipe.rl_started = 2, tiny_stages(), True
    calls = []
    recipe.grpo = SimpleNamespace(prepare=lambda step, timer, **kw: (calls.append(kw), ({}, {}))[1], loss=None)
    for step in (2, 25, 26, 49):  # first and last step of stage 1 (24 steps), then of stage 2
        recipe.prepare_rl(step, None)
    assert [(c["max_new_tokens"], c["num_generations"]) for c in calls] == [(24, 8), (24, 8), (48, 4), (48, 4)]


# ---- end to end ----------------------------------------------------------------------------

def test_cold_start_then_ptst_stages_then_eval(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "vision_r1", f"output_dir={run}", "cold_start.lr=1e-3", "optim.lr=1e-4", *SHORT]) == 0
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, 8))
    got = [(r["stage"], r["stage_index"], r["max_new_tokens"], r["num_generations"]) for r in records]
    assert got == [("cold_start", 0, 512, 0)] * 3 + [("stage1", 1, 24, 4)] * 2 + [("stage2", 2, 48, 2)] * 2
    for r in records:
        assert r["loss"] is not None and 0.0 <= r["truncated_frac"] <= 1.0
    assert all("reward" in r and "kl" in r for r in records[3:])
    # per-phase learning rates (the lr each update used): the cold start at its own lr,
    # warming up over 10 steps (step 1 at 1/10 of 1e-3), RL at optim.lr
    assert records[0]["lr"] == pytest.approx(1e-4) and records[1]["lr"] == pytest.approx(2e-4)
    assert records[3]["lr"] == pytest.approx(1e-4)
    # the KL reference is the cold-start model: at the first RL step, policy == reference
    assert records[3]["kl"] == pytest.approx(0.0, abs=1e-7)
    # held-out evaluation at every stage end, in metrics.jsonl and eval_stages.jsonl
    assert [r["step"] for r in records if "eval/accuracy" in r] == [3, 5, 7]
    assert all("eval/format_rate" in r and r["eval/rows"] == 4 for r in records if "eval/accuracy" in r)
    evals = [json.loads(line) for line in (run / "eval_stages.jsonl").read_text().splitlines()]
    assert [(e["step"], e["stage"]) for e in evals] == [(3, "cold_start"), (5, "stage1"), (7, "stage2")]
    assert evals[-1]["accuracy"] == records[-1]["eval/accuracy"]
    # the cold-start model is kept and loads; the final model loads
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(run / "cold_start")
    AutoModelForImageTextToText.from_pretrained(run / "final")
    # plot: stage boundaries come from the `stage` metric
    from vlreason.plotting import _stage_starts

    assert [label for _, label in _stage_starts(records)] == ["cold_start", "stage1", "stage2"]
    assert main(["plot", str(run)]) == 0 and (run / "curves.png").stat().st_size > 10_000
    # vlreason eval writes the JSON report for the final model
    from vlreason.paths import demo_data

    assert main(["eval", "--model", str(run / "final"), "--data", str(demo_data("eval")),
                 "limit=4", "max_new_tokens=24"]) == 0
    report = json.loads((run / "final" / "eval_eval.json").read_text())
    assert report["rows"] == 4 and {"accuracy", "format_rate", "length_mean", "truncation_rate"} <= report.keys()


def test_lora_cold_start_keeps_its_adapter_as_the_reference(tmp_path):
    run = tmp_path / "lora"
    assert main(["train", "vision_r1", f"output_dir={run}", "model.lora.enabled=true", "model.lora.r=4",
                 "cold_start.steps=2", "cold_start.prompts_per_step=2", "cold_start.micro_batch_prompts=2",
                 "ptst.stages=[{name: s1, max_new_tokens: 8, num_generations: 2, steps: 1}]",
                 "prompts_per_step=1", "stage_eval=false", "progress=false"]) == 0
    records = _metrics(run)
    assert [r["stage"] for r in records] == ["cold_start", "cold_start", "s1"]
    assert records[2]["kl"] == pytest.approx(0.0, abs=1e-7)  # reference = cold-start adapter, not the base
    assert (run / "final" / "adapter_config.json").is_file()


def _run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlreason", "train", "vision_r1", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_inside_stage2_then_resume_matches_uninterrupted_run(tmp_path):
    from vlreason.paths import warm_model

    # From the warm checkpoint so that RL gets non-zero rewards and moves the weights.
    args = [f"model.name_or_path={warm_model()}", "cold_start.lr=1e-4", "optim.lr=1e-3",
            "optim.schedule=cosine", "optim.warmup_steps=1", "save_steps=2", *SHORT]
    args = [a.replace("steps: 2}]", "steps: 6}]") for a in args]  # stage 2: steps 6-11
    straight = tmp_path / "straight"
    assert main(["train", "vision_r1", f"output_dir={straight}", *args]) == 0
    assert [r["stage"] for r in _metrics(straight)][-7:] == ["stage1"] + ["stage2"] * 6

    run = tmp_path / "interrupted"
    proc = _run_cli([f"output_dir={run}", *args])
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for the first stage-2 step's line, then SIGTERM
        path = run / "metrics.jsonl"
        if path.exists() and '"stage": "stage2"' in path.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    records = _metrics(run)
    stopped_at = len(records)
    assert records[-1]["stage"] == "stage2" and stopped_at < 11, f"not stopped inside stage 2: {stopped_at}"
    checkpoint = run / "checkpoints" / f"step-{stopped_at}"
    stopped = load_file(str(checkpoint / "model.safetensors"))  # before resume prunes it

    assert main(["train", "vision_r1", f"output_dir={run}", "resume=auto", *args]) == 0
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[n], stopped[n]) for n in stopped), "stage 2 after the stop did not move the weights"
    for name in a:  # same seed, same data order, same samples, same reference: equal to rounding
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    ra, rb = _metrics(straight), _metrics(run)
    assert [r["step"] for r in rb] == list(range(1, 12)), "metrics.jsonl has gaps or duplicates after resume"
    assert [r.get("reward") for r in ra] == [r.get("reward") for r in rb]
    assert [r["lr"] for r in ra] == pytest.approx([r["lr"] for r in rb])
    assert (straight / "eval_stages.jsonl").read_text() == (run / "eval_stages.jsonl").read_text()


# ---- learning check -----------------------------------------------------------------------

def _greedy(model_dir: Path, data: Path) -> dict:
    from vlreason.data.schema import load_canonical
    from vlreason.evaluation import EvalConfig, evaluate
    from vlreason.models.loading import ModelConfig
    from vlreason.rollout.policy import Policy, RolloutConfig

    policy = Policy.load(ModelConfig(name_or_path=str(model_dir)), RolloutConfig())
    return evaluate(policy, load_canonical(data), EvalConfig(max_new_tokens=48))[0]


@pytest.mark.slow
def test_ptst_raises_heldout_accuracy_over_cold_start_alone(tmp_path):
    """Cold start + PTST vs cold start alone, one run, on the synthetic colour task.

    Setup: the tiny *random* model; 90 cold-start steps (batch 16, lr 2e-3) on 512 colour
    rows, whose solutions are 20 or 27 tokens with the end token; then stage 1 (24 tokens x
    G=8, truncating the 27-token ones: 27% of them) and stage 2 (48 x G=4), 30 steps each,
    8 prompts a step, lr 3e-4, hard reward, KL 0.01 to the cold-start model. Held-out: 128
    fresh rows, evaluated by the recipe at each stage end with 4 samples at temperature 1
    (the policy GRPO optimises; eval_stages.jsonl), and greedily from cold_start/ and final/.
    Observed (2-core CPU; the test takes ~30 s, ~280 s while other jobs shared the machine):
    sampled accuracy 0.33 -> 0.60 (sampled format rate 0.60 -> 0.76), greedy accuracy
    0.90 -> 1.00 with greedy format rate 1.00 -> 1.00; the greedy answers get shorter
    (20 -> 14 tokens: thinking suppressed).
    Asserted: sampled accuracy rises by at least 0.10 from the cold-start end to the end of
    stage 2; greedy accuracy does not fall by more than 0.02; greedy format rate >= 0.95.
    """
    from data_pipelines.synthetic import build_dataset

    train = build_dataset("color", 512, 0, tmp_path / "train")
    heldout = build_dataset("color", 128, 99, tmp_path / "heldout")
    run = tmp_path / "run"
    assert main(["train", "vision_r1", f"output_dir={run}", f"data.train={train}", f"data.eval={heldout}",
                 "cold_start.steps=90", "cold_start.lr=2e-3", "cold_start.prompts_per_step=16",
                 "cold_start.micro_batch_prompts=16",
                 "ptst.stages=[{name: stage1, max_new_tokens: 24, num_generations: 8, steps: 30},"
                 " {name: stage2, max_new_tokens: 48, num_generations: 4, steps: 30}]",
                 "prompts_per_step=8", "algorithm.micro_batch_prompts=4", "optim.lr=3e-4",
                 "eval.temperature=1.0", "eval.num_samples=4", "eval.max_new_tokens=48", "progress=false"]) == 0
    evals = {e["stage"]: e for e in map(json.loads, (run / "eval_stages.jsonl").read_text().splitlines())}
    before, after = evals["cold_start"], evals["stage2"]
    greedy_before, greedy_after = _greedy(run / "cold_start", heldout), _greedy(run / "final", heldout)
    print(f"held-out sampled accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
          f"(format {before['format_rate']:.3f} -> {after['format_rate']:.3f}); greedy accuracy "
          f"{greedy_before['accuracy']:.3f} -> {greedy_after['accuracy']:.3f} (format "
          f"{greedy_before['format_rate']:.3f} -> {greedy_after['format_rate']:.3f})")
    assert after["accuracy"] >= before["accuracy"] + 0.10, (before, after)
    assert greedy_after["accuracy"] >= greedy_before["accuracy"] - 0.02, (greedy_before, greedy_after)
    assert greedy_after["format_rate"] >= 0.95, greedy_after
