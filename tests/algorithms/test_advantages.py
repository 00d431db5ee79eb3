"""Group advantages: hand-worked values and a per-group loop reference."""

import math

import pytest
import torch

from vlreason.algorithms import ADVANTAGES, group_advantages, group_index


def reference_loop(rewards, group_ids, normalize_std=True, eps=1e-6):
    """Slow reference: one group at a time with torch.std (unbiased, like verl/TRL)."""
    out = torch.zeros_like(rewards)
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        r = rewards[idx]
        if len(idx) == 1 or bool((r == r[0]).all()):
            out[idx] = 0.0
            continue
        a = r - r.mean()
        if normalize_std:
            a = a / (r.std() + eps)
        out[idx] = a
    return out


def test_hand_worked_single_group():
    # rewards [1, 0, 0, 1]: mean 0.5; unbiased std = sqrt((4 * 0.25) / 3) = 0.57735
    # advantages = +-0.5 / 0.57735 = +-0.866025
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    expected = torch.tensor([1, -1, -1, 1]) * 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv, expected.float(), atol=1e-5, rtol=0)
    assert abs(adv[0].item() - 0.8660) < 1e-4


def test_hand_worked_drgrpo():
    # rewards [1, 0, 0, 0]: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]
    adv = ADVANTAGES["drgrpo"](torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_two_contiguous_groups():
    # group 0: [1, 0] mean .5 std .7071 -> [+.7071, -.7071]; group 1: [2, 2] constant -> 0
    adv = ADVANTAGES["grpo"](torch.tensor([1.0, 0.0, 2.0, 2.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([0.70711, -0.70711, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_all_equal_is_exact_zero():
    # 0.1 is not exactly representable: a naive (r - mean) / (std + eps) gives ~1e-11, not 0
    adv = group_advantages(torch.full((8,), 0.1), 4)
    assert torch.equal(adv, torch.zeros(8))
    adv = group_advantages(torch.full((8,), 0.1), 4, normalize_std=False)
    assert torch.equal(adv, torch.zeros(8))


def test_group_of_one_no_nan():
    # G=1: unbiased std is 0/0; we return 0 (the member equals its group mean)
    for normalize in (True, False):
        adv = group_advantages(torch.tensor([0.3, 1.0, -2.0]), 1, normalize_std=normalize)
        assert torch.equal(adv, torch.zeros(3))
    adv = group_advantages(torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0, 0, 1]))
    assert torch.isfinite(adv).all() and adv[2] == 0


def test_arbitrary_group_ids_equal_contiguous():
    torch.manual_seed(0)
    r = torch.rand(12)
    contiguous = group_advantages(r, 4)
    perm = torch.randperm(12)
    ids = (torch.arange(12) // 4) * 17 + 5  # non-dense labels
    shuffled = group_advantages(r[perm], ids[perm])
    torch.testing.assert_close(shuffled, contiguous[perm])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_groups,group_size", [(1, 2), (3, 4), (8, 16), (5, 1), (2, 7)])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_vectorised_matches_loop(seed, num_groups, group_size, normalize_std):
    g = torch.Generator().manual_seed(seed)
    n = num_groups * group_size
    rewards = torch.randint(0, 3, (n,), generator=g).double() * 0.5  # ties and constant groups
    ids = torch.arange(n) // group_size
    expected = reference_loop(rewards, ids, normalize_std)
    torch.testing.assert_close(
        group_advantages(rewards, group_size, normalize_std=normalize_std), expected
    )
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(
        group_advantages(rewards[perm], ids[perm] * 3, normalize_std=normalize_std), expected[perm]
    )


def test_uneven_groups_match_loop():
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3])
    rewards = torch.rand(len(ids), generator=g)
    torch.testing.assert_close(group_advantages(rewards, ids), reference_loop(rewards, ids))


def test_integer_rewards_and_errors():
    adv = group_advantages(torch.tensor([1, 0]), 2)
    assert adv.dtype == torch.float32
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        group_index(torch.zeros(4), 4)
