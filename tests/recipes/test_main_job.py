"""The README's main job, `vlreason train grpo` with no arguments: it evaluates the demo
eval split before the first step and after the last, prints both, logs them as eval/*
and writes RUN_DIR/eval.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlreason.cli import main

FAST = ["max_steps=2", "rollout.num_generations=2", "rollout.max_new_tokens=16",
        "prompts_per_step=2", "algorithm.micro_batch_prompts=1",
        "eval.limit=6", "eval.num_samples=2", "eval.max_new_tokens=16", "progress=false"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_heldout_eval_before_first_and_after_last_step(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "grpo", f"output_dir={run}", *FAST]) == 0
    out = capsys.readouterr().out
    points = _lines(run / "eval.jsonl")
    assert [p["step"] for p in points] == [0, 2]
    assert all(p["rows"] == 6 and p["samples_per_row"] == 2 for p in points)
    before, after = points[0]["accuracy"], points[1]["accuracy"]
    assert f"held-out accuracy: {before:.3f} before training -> {after:.3f} after step 2" in out
    metrics = _lines(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["eval/accuracy"] == before and "loss" not in metrics[0]
    assert metrics[-1]["eval/accuracy"] == after and "eval/accuracy" not in metrics[1]

    # the after figure is the final model's own: evaluating final/ again gives the same number
    from vlreason.data.schema import load_canonical
    from vlreason.evaluation import EvalConfig, evaluate
    from vlreason.models.loading import ModelConfig
    from vlreason.paths import demo_data
    from vlreason.rollout.policy import Policy, RolloutConfig

    policy = Policy.load(ModelConfig(name_or_path=str(run / "final")), RolloutConfig(max_pixels=12544))
    again, _ = evaluate(policy, load_canonical(demo_data("eval")),
                        EvalConfig(num_samples=2, temperature=1.0, max_new_tokens=16, limit=6))
    assert again["accuracy"] == after


def test_resume_does_not_evaluate_the_start_again(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "grpo", f"output_dir={run}", *FAST]) == 0
    assert "eval before training" in capsys.readouterr().out
    assert main(["train", "grpo", f"output_dir={run}", *FAST, "max_steps=3", "resume=auto"]) == 0
    out = capsys.readouterr().out
    assert "eval before training" not in out and "eval after training (step 3" in out
    assert [p["step"] for p in _lines(run / "eval.jsonl")] == [0, 2, 3]
    assert [m["step"] for m in _lines(run / "metrics.jsonl")] == [0, 1, 2, 3]


def test_heldout_eval_can_be_switched_off(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "grpo", f"output_dir={run}", *FAST, "heldout_eval=false"]) == 0
    assert not (run / "eval.jsonl").exists()
    assert [m["step"] for m in _lines(run / "metrics.jsonl")] == [1, 2]


MARGIN = 0.01  # held-out accuracy after minus before, in at least 4 of 5 seeds


@pytest.mark.slow
def test_main_job_raises_heldout_accuracy_over_seeds(tmp_path):
    """The README's `vlreason train grpo` with no other arguments, seeds 0-4.

    Measured on the 2-core machine (about 90 s a seed): held-out accuracy (64 rows x 4
    samples at T=1) 0.504 before, after +0.047, +0.016, +0.012, +0.047, +0.047; train reward
    last 10 steps minus first 10: +0.051, -0.009, +0.039, +0.057, +0.111. The effect is
    small (the tiny model saturates on colour and hardly perceives counting): asserted are
    a rise of at least MARGIN in 4 of 5 seeds and a rising reward curve on average."""
    rises, reward_rises = [], []
    for seed in range(5):
        run = tmp_path / f"seed{seed}"
        assert main(["train", "grpo", f"output_dir={run}", f"seed={seed}", "progress=false"]) == 0
        points = _lines(run / "eval.jsonl")
        rises.append(points[-1]["accuracy"] - points[0]["accuracy"])
        rewards = [m["reward"] for m in _lines(run / "metrics.jsonl") if "reward" in m]
        reward_rises.append(sum(rewards[-10:]) / 10 - sum(rewards[:10]) / 10)
    print(f"held-out accuracy rise per seed {[round(r, 3) for r in rises]}; "
          f"reward rise (last 10 - first 10) {[round(r, 3) for r in reward_rises]}")
    assert sum(r >= MARGIN for r in rises) >= 4, rises
    assert sum(reward_rises) / len(reward_rises) > 0, reward_rises
