"""DAPO's two data-side techniques (arXiv 2503.14476), as pure functions.

Dynamic sampling
----------------
A prompt group whose G rewards are all equal has group advantage exactly 0 for every
member (see :mod:`vlreason.algorithms.advantages`): it contributes no policy gradient,
only a smaller effective batch. DAPO drops such groups and samples further prompts until
the batch holds the wanted number of informative groups.
:func:`informative_groups` marks the groups to keep; :func:`plan_refill` decides, round
by round, whether to sample again (always bounded by a maximum number of rounds: the
caller can never loop forever); :func:`take_first` picks the groups that fill the batch.

    rewards [1, 1, 1, 1 | 0, 1, 0, 0 | 0, 0, 0, 0], G = 4
    informative_groups(...) -> [False, True, False]

Overlong reward shaping
-----------------------
With ``L_max`` the generation limit and ``L_cache`` the soft-punishment window at its
end, a completion of ``|y|`` tokens (end token included) gets

    R_length(y) =  0                               |y| <= L_max - L_cache
                   ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
                   -1                              |y| > L_max

times ``penalty_factor`` (DAPO: 1), added to its task reward. Example, L_max = 20,
L_cache = 4: lengths 16 -> 0, 17 -> -0.25, 18 -> -0.5, 20 -> -1 (a completion cut at
the limit always gets the full -1). DAPO's run: L_max 20,480 = 16,384 expected + 4,096
cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlreason.algorithms.advantages import group_index

__all__ = [
    "informative_groups",
    "overlong_penalty",
    "plan_refill",
    "take_first",
]


def informative_groups(rewards_N: Tensor, groups: int | Tensor, *, atol: float = 0.0) -> Tensor:
    """Bool ``[num_groups]``: True where a group's rewards are not all equal.

    ``groups`` is a group size G (contiguous groups) or integer ``group_ids_N``; groups are
    numbered as :func:`~vlreason.algorithms.advantages.group_index` numbers them (for G,
    group k is items ``[kG, (k+1)G)``). Equal means ``max - min <= atol`` (default exact,
    matching the advantages' exact-zero rule). A group of one completion is never
    informative.
    """
    if rewards_N.dim() != 1:
        raise ValueError(f"rewards_N must be 1-D, got shape {tuple(rewards_N.shape)}")
    r = rewards_N if rewards_N.is_floating_point() else rewards_N.float()
    index_N, num_groups = group_index(groups, r.shape[0], device=r.device)
    if num_groups == 0:
        return torch.zeros(0, dtype=torch.bool, device=r.device)
    max_G = torch.full((num_groups,), float("-inf"), dtype=r.dtype, device=r.device).scatter_reduce(
        0, index_N, r, reduce="amax")
    min_G = torch.full((num_groups,), float("inf"), dtype=r.dtype, device=r.device).scatter_reduce(
        0, index_N, r, reduce="amin")
    return (max_G - min_G) > atol


def plan_refill(kept: int, target: int, rounds_done: int, max_rounds: int) -> bool:
    """Whether to sample another round of prompts.

    ``kept`` informative groups so far, ``target`` wanted, ``rounds_done`` rounds sampled
    (>= 1), ``max_rounds`` the cap (>= 1, counting the first round). True only while the
    batch is short AND the cap is not reached, so a loop ``while plan_refill(...)`` ends
    after at most ``max_rounds`` rounds whatever the rewards are.
    """
    if target < 1 or max_rounds < 1 or rounds_done < 1:
        raise ValueError(f"need target >= 1, max_rounds >= 1, rounds_done >= 1; got "
                         f"{target}, {max_rounds}, {rounds_done}")
    return kept < target and rounds_done < max_rounds


def take_first(keep_flags: list[list[bool]], target: int) -> list[list[bool]]:
    """Of the kept groups, listed round by round (``keep_flags[r][i]``: group i of round r
    is informative), keep the first ``target`` in (round, index) order and drop the rest
    (DAPO trims the surplus of the last round). Returns flags of the same shape."""
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    out, left = [], target
    for flags in keep_flags:
        row = []
        for flag in flags:
            take = bool(flag) and left > 0
            left -= int(take)
            row.append(take)
        out.append(row)
    return out


def overlong_penalty(lengths_N: Tensor, max_length: int, cache_length: int,
                     penalty_factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment ``R_length`` (module docstring), in ``[-penalty_factor, 0]``.

    Args:
        lengths_N: completion lengths in tokens (end token included), [N].
        max_length: ``L_max``, the generation limit (``max_new_tokens``).
        cache_length: ``L_cache``, the window before ``L_max`` over which the penalty grows
            linearly from 0 to -1; must satisfy ``0 < L_cache <= L_max``.
        penalty_factor: scales the penalty (DAPO: 1.0).

    Returns:
        float tensor [N] (float32 unless ``lengths_N`` is floating).
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    n = lengths_N if lengths_N.is_floating_point() else lengths_N.float()
    expected = max_length - cache_length
    penalty = ((expected - n) / cache_length).clamp(min=-1.0, max=0.0)
    return penalty * penalty_factor
