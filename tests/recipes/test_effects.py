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
repeat texts that won a coin). The PTST, Vision-OPD and DVRP checks are not written yet.
"""

from __future__ import annotations

import textwrap

import pytest

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
