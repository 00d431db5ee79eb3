"""SOPHIA's solution selection (arXiv 2507.16814), a pure function of rewards and texts.

Caption reward R(c) = mean reward of the solutions the reasoner wrote from caption c; a
solution is kept only if it is correct under a caption with R(c) above the threshold, in
the target format, within the length limit, and the shortest such one of its row.
Used by ``recipes/sophia.py``; tests in ``tests/recipes/test_sophia.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Selection", "select_solutions"]


@dataclass
class Selection:
    """One row's outcome: caption rewards R(c), the kept solution (or None) and where it came
    from; ``rejected`` says why a row that had correct solutions under a good caption kept
    none: ``malformed`` (none in the target format) or ``too_long`` (the shortest well-formed
    one is over the length limit, so every one is)."""
    caption_rewards: list[float]
    kept: str | None
    kept_caption: int | None = None
    kept_solution: int | None = None
    rejected: str | None = None


def select_solutions(rewards: list[list[float]], solutions: list[list[str]], *, threshold: float,
                     length=len, well_formed=lambda text: True, max_length: int | None = None) -> Selection:
    """SOPHIA's selection for one row: ``rewards[k][j]`` / ``solutions[k][j]`` of caption k.

    R(c_k) = mean_j rewards[k][j]; keep the shortest (by ``length``) solution that is
    correct (reward 1) under a caption with R(c) > threshold, ``well_formed`` and at most
    ``max_length`` long; ties go to the earlier caption, then the earlier solution. At most
    one kept solution. Malformed or over-long candidates are never kept, not even cut."""
    caption_rewards = [sum(r) / len(r) if r else 0.0 for r in rewards]
    candidates = [(k, j, text) for k, (rs, sols) in enumerate(zip(rewards, solutions))
                  if caption_rewards[k] > threshold for j, (r, text) in enumerate(zip(rs, sols)) if r >= 1.0]
    formed = [(length(text), k, j) for k, j, text in candidates if well_formed(text)]
    fits = [c for c in formed if max_length is None or c[0] <= max_length]
    if not fits:
        rejected = None if not candidates else "too_long" if formed else "malformed"
        return Selection(caption_rewards, None, rejected=rejected)
    _, k, j = min(fits)
    return Selection(caption_rewards, solutions[k][j], k, j)
