"""Strict ``<think>...</think><answer>...</answer>`` format reward and answer extraction.

A completion has the strict format when, after stripping surrounding whitespace, it is
exactly

    <think> T </think> (optional whitespace) <answer> A </answer>

with T and A non-empty after stripping, and no other think/answer tag anywhere: no
repeated blocks, no nesting, no stray or differently-cased tags (``<Answer>``,
``< /answer >`` count as tags too), nothing before ``<think>`` and nothing after
``</answer>``. Each of the reward-hacking patterns reported against other toolkits
(empty ``<answer></answer>``, repeated answer blocks, text after ``</answer>``, an
answer outside the tags, a missing think block) fails the check.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["extract_answer", "format_reward", "is_strict_format"]

# Any think/answer tag, tolerant of case and inner whitespace, so that variants of the
# structural tags are counted (and rejected) rather than silently treated as text.
# Written so that no two whitespace runs are adjacent (``<\s*/?\s*`` backtracks
# quadratically: "<" followed by 40,000 spaces took over a minute); linear time.
_ANY_TAG = re.compile(r"<\s*(?:/\s*)?(?:think|answer)\s*>", re.IGNORECASE)
_STRICT = re.compile(r"<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(?P<answer>.*?)</answer>", re.DOTALL)
_ANSWER_TAG = re.compile(r"<\s*(?:/\s*)?answer\s*>", re.IGNORECASE)


def is_strict_format(completion: str) -> bool:
    """True iff ``completion`` has exactly the strict think-then-answer structure."""
    text = completion.strip()
    if len(_ANY_TAG.findall(text)) != 4:
        return False
    match = _STRICT.fullmatch(text)
    if match is None:
        return False
    return bool(match.group("think").strip()) and bool(match.group("answer").strip())


def format_reward(completion: str, ground_truth: str = "", **info: Any) -> float:
    """1.0 if :func:`is_strict_format` holds, else 0.0. ``ground_truth`` is not used."""
    del ground_truth, info
    return 1.0 if is_strict_format(completion) else 0.0


def extract_answer(completion: str) -> str | None:
    """Content of the single ``<answer>...</answer>`` block, stripped; ``None`` otherwise.

    ``None`` when there is no answer block, more than one answer tag pair, a nested or
    unbalanced or differently-cased answer tag, a think tag inside the answer, or an empty
    (whitespace-only) answer. Does NOT require the think block or reject text around the
    answer block: that is :func:`format_reward`'s job (accuracy and format are scored, and
    logged, separately; :func:`~vlreason.rewards.combine.hard_format_and_correct` needs both).
    """
    if len(_ANSWER_TAG.findall(completion)) != 2:
        return None
    match = _ANSWER_BLOCK.search(completion)
    if match is None:
        return None
    answer = match.group("answer")
    if _ANY_TAG.search(answer):
        return None
    answer = answer.strip()
    return answer or None
