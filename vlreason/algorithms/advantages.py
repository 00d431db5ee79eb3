"""Group-relative advantages (GRPO, Dr.GRPO).

For completion i of a prompt group g with rewards r:

    GRPO:     A_i = (r_i - mean_g(r)) / (std_g(r) + eps)
    Dr.GRPO:  A_i =  r_i - mean_g(r)

``std_g`` is the *unbiased* (Bessel-corrected, divide by n-1) standard deviation, as
``torch.std`` computes it and as verl and TRL use it. Example, one group of four:
rewards [1, 0, 0, 1] -> mean 0.5, std sqrt(4 * 0.25 / 3) = 0.5774,
advantages [+0.866, -0.866, -0.866, +0.866].

Edge cases (both return exact zeros, never NaN):

- a group whose rewards are all equal (no learning signal) -> advantage 0 for every member;
- a group of size 1: its unbiased std is undefined (0/0); the member equals its group mean,
  so its advantage is 0 with or without std normalisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGES",
    "drgrpo_advantages",
    "group_advantages",
    "group_index",
    "grpo_advantages",
]


def group_index(
    groups: int | Tensor, n: int, device: torch.device | None = None
) -> tuple[Tensor, int]:
    """Map each of ``n`` items to a dense group index in ``[0, num_groups)``.

    Args:
        groups: either an ``int`` G (items ``[k*G, (k+1)*G)`` form group k; ``n % G == 0``)
            or an integer tensor ``group_ids_N`` of arbitrary (not necessarily contiguous or
            sorted) group labels.
        n: number of items.

    Returns:
        ``(index_N, num_groups)`` with ``index_N`` a long tensor.
    """
    if isinstance(groups, int):
        if groups <= 0 or n % groups != 0:
            raise ValueError(f"group size {groups} does not divide the number of items {n}")
        return torch.arange(n, device=device) // groups, n // groups
    group_ids_N = torch.as_tensor(groups, device=device)
    if group_ids_N.shape != (n,):
        raise ValueError(f"group_ids_N has shape {tuple(group_ids_N.shape)}, expected ({n},)")
    if group_ids_N.is_floating_point():
        raise TypeError("group ids must be integers")
    _, index_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(index_N.max().item()) + 1 if n > 0 else 0
    return index_N, num_groups


def group_advantages(
    rewards_N: Tensor,
    groups: int | Tensor,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages, vectorised over all groups.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` if ``normalize_std`` else ``r_i - mean_g``,
    with ``std_g`` the unbiased standard deviation of group g (see the module docstring for
    the all-equal and size-1 cases, which give exactly 0).

    Args:
        rewards_N: rewards, shape [N].
        groups: group size G (contiguous groups) or ``group_ids_N`` (any integer labels).
        normalize_std: divide by the group std (GRPO); False gives Dr.GRPO.
        eps: added to the std in the denominator.

    Returns:
        advantages_N in the rewards' dtype (float32 for integer or bool rewards).
    """
    if rewards_N.dim() != 1:
        raise ValueError(f"rewards_N must be 1-D, got shape {tuple(rewards_N.shape)}")
    r = rewards_N if rewards_N.is_floating_point() else rewards_N.float()
    n = r.shape[0]
    index_N, num_groups = group_index(groups, n, device=r.device)
    if n == 0:
        return r.clone()

    counts_G = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(
        0, index_N, torch.ones_like(r)
    )
    sums_G = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, index_N, r)
    mean_G = sums_G / counts_G
    centred_N = r - mean_G[index_N]

    # Exact zero for groups with no reward spread (also covers groups of size 1).
    max_G = torch.full((num_groups,), float("-inf"), dtype=r.dtype, device=r.device)
    min_G = torch.full((num_groups,), float("inf"), dtype=r.dtype, device=r.device)
    max_G = max_G.scatter_reduce(0, index_N, r, reduce="amax")
    min_G = min_G.scatter_reduce(0, index_N, r, reduce="amin")
    constant_N = (max_G == min_G)[index_N]

    if normalize_std:
        sq_G = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(
            0, index_N, centred_N * centred_N
        )
        var_G = sq_G / (counts_G - 1).clamp(min=1)  # unbiased; size-1 groups give 0, not NaN
        adv_N = centred_N / (var_G.sqrt()[index_N] + eps)
    else:
        adv_N = centred_N
    return torch.where(constant_N, torch.zeros_like(adv_N), adv_N)


def grpo_advantages(rewards_N: Tensor, groups: int | Tensor, *, eps: float = 1e-6) -> Tensor:
    """GRPO: ``(r - mean_g) / (std_g + eps)`` (unbiased std)."""
    return group_advantages(rewards_N, groups, normalize_std=True, eps=eps)


def drgrpo_advantages(rewards_N: Tensor, groups: int | Tensor, *, eps: float = 1e-6) -> Tensor:
    """Dr.GRPO: ``r - mean_g`` (no std normalisation; ``eps`` is accepted and unused)."""
    del eps
    return group_advantages(rewards_N, groups, normalize_std=False)


ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
}
