"""GRPO scores each completion once: every reward component runs once per completion,
and the logged components are the ones the total was made of."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vlreason.rewards import weighted
from vlreason.train.grpo import score


def _batch(texts, answers, groups):
    rows = [{"answer": a, "choices": []} for a in answers]
    return SimpleNamespace(texts=texts, group_ids_N=torch.tensor(groups), truncated_N=torch.zeros(len(texts), dtype=torch.bool),
                           prompts=SimpleNamespace(rows=rows))


def _counting(value_of):
    calls = []

    def fn(completion, ground_truth, **info):
        calls.append(completion)
        return value_of(completion, ground_truth)

    return fn, calls


def test_each_component_runs_once_per_completion():
    exact, exact_calls = _counting(lambda c, g: float(c == g))
    length, length_calls = _counting(lambda c, g: len(c) / 10)
    reward = weighted(exact=(exact, 0.9), length=(length, 0.1))
    batch = _batch(["a", "bb", "a", "ccc"], ["a", "b"], [0, 0, 1, 1])
    rewards, parts = score(reward, batch)
    assert exact_calls == ["a", "bb", "a", "ccc"] and length_calls == exact_calls
    # hand-worked: row 0's answer is "a", row 1's is "b"
    assert rewards.tolist() == pytest.approx([0.9 + 0.01, 0.02, 0.01, 0.03])
    assert parts["exact"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert parts["length"].tolist() == pytest.approx([0.1, 0.2, 0.1, 0.3])


def test_a_plain_reward_function_runs_once_and_logs_no_components():
    fn, calls = _counting(lambda c, g: float(c == g))
    rewards, parts = score(fn, _batch(["a", "b"], ["a"], [0, 0]))
    assert calls == ["a", "b"] and rewards.tolist() == [1.0, 0.0] and parts == {}
