"""DAPO dynamic sampling and overlong reward shaping: hand-worked values, a loop
reference, and the refill plan's bound."""

import pytest
import torch

from vlreason.algorithms.advantages import grpo_advantages
from vlreason.algorithms.dapo import informative_groups, overlong_penalty, plan_refill, take_first


def test_informative_groups_hand_worked():
    # groups of 4: [1,1,1,1] all equal, [0,1,0,0] mixed, [0,0,0,0] all equal, [.5,.5,.5,.25] mixed
    rewards = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.25])
    assert informative_groups(rewards, 4).tolist() == [False, True, False, True]


def test_informative_groups_match_nonzero_advantages_on_random_rewards():
    # reference: a group is informative exactly when some member's GRPO advantage is non-zero
    gen = torch.Generator().manual_seed(0)
    for G in (2, 3, 8):
        rewards = torch.randint(0, 2, (G * 25,), generator=gen).float()
        adv = grpo_advantages(rewards, G).view(-1, G)
        assert informative_groups(rewards, G).tolist() == (adv != 0).any(-1).tolist()


def test_informative_groups_with_group_ids_and_tolerance():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0 + 1e-9], dtype=torch.float64)
    ids = torch.tensor([7, 3, 7, 3])  # groups numbered by sorted label: 3 -> 0, 7 -> 1
    assert informative_groups(rewards, ids).tolist() == [True, False]
    assert informative_groups(torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64), 2).tolist() == [True]
    assert informative_groups(torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64), 2, atol=1e-6).tolist() == [False]
    assert informative_groups(torch.tensor([1.0, 0.0]), 1).tolist() == [False, False]  # G = 1


def test_plan_refill_stops_when_full_or_at_the_cap():
    assert plan_refill(kept=3, target=8, rounds_done=1, max_rounds=4)
    assert not plan_refill(kept=8, target=8, rounds_done=1, max_rounds=4)
    assert not plan_refill(kept=9, target=8, rounds_done=2, max_rounds=4)
    assert not plan_refill(kept=0, target=8, rounds_done=4, max_rounds=4)
    assert not plan_refill(kept=0, target=8, rounds_done=1, max_rounds=1)  # cap 1 = no refill
    with pytest.raises(ValueError):
        plan_refill(kept=0, target=8, rounds_done=0, max_rounds=4)


def test_a_refill_loop_that_never_finds_a_group_ends_at_the_cap():
    rounds = 1
    while plan_refill(kept=0, target=4, rounds_done=rounds, max_rounds=5):
        rounds += 1
    assert rounds == 5


def test_take_first_trims_the_last_rounds_surplus():
    flags = [[True, False, True], [True, True, False], [True, True, True]]
    assert take_first(flags, 3) == [[True, False, True], [True, False, False], [False, False, False]]
    assert take_first(flags, 10) == flags
    assert take_first(flags, 0) == [[False] * 3] * 3


def test_overlong_penalty_hand_worked():
    # L_max 20, L_cache 4: expected length 16; (16 - |y|) / 4 past it, -1 at and beyond 20
    lengths = torch.tensor([1, 16, 17, 18, 19, 20, 25])
    expected = [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 4).tolist() == pytest.approx(expected)
    assert overlong_penalty(lengths, 20, 4, penalty_factor=0.5).tolist() == pytest.approx([v / 2 for v in expected])


def test_overlong_penalty_dapo_sizes_and_bad_arguments():
    # DAPO: L_max 20,480 with a 4,096 cache -> no penalty up to 16,384, -0.5 at 18,432
    got = overlong_penalty(torch.tensor([16384, 16385, 18432, 20480]), 20480, 4096)
    assert got.tolist() == pytest.approx([0.0, -1 / 4096, -0.5, -1.0])
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), 10, 0)
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), 10, 11)
