"""Pure reward functions ``(completion: str, ground_truth: str, **info) -> float``.

Per-sample extras travel in ``info`` (``choices``, ``truncated``, ...); each reward ignores
what it does not use. Pick one by name from :data:`REWARDS`, or load a user reward with
:func:`load_reward` (``"package.module:function"``).
"""

from vlreason.rewards.accuracy import accuracy_reward, answers_match, math_equal
from vlreason.rewards.combine import (
    REWARDS,
    RewardFn,
    WeightedReward,
    get_reward,
    hard_format_and_correct,
    load_reward,
    weighted,
)
from vlreason.rewards.format import extract_answer, format_reward, is_strict_format
from vlreason.rewards.iou import box_iou, iou_reward, parse_box

__all__ = [
    "REWARDS",
    "RewardFn",
    "WeightedReward",
    "accuracy_reward",
    "answers_match",
    "box_iou",
    "extract_answer",
    "format_reward",
    "get_reward",
    "hard_format_and_correct",
    "iou_reward",
    "is_strict_format",
    "load_reward",
    "math_equal",
    "parse_box",
    "weighted",
]
