"""Box IoU reward for grounding answers like ``<answer>[x0, y0, x1, y1]</answer>``.

    IoU(a, b) = area(a & b) / (area(a) + area(b) - area(a & b))

Boxes are ``[x0, y0, x1, y1]`` with x0 <= x1, y0 <= y1, in the same coordinate frame
for prediction and ground truth (this module does not rescale). The answer must contain
exactly one box: a bare list, or one list inside other text such as Qwen2.5-VL's
``{"bbox_2d": [x0, y0, x1, y1], "label": "cat"}``. Several boxes, a malformed box or an
inverted box score 0, so listing many candidate boxes cannot raise the reward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from vlreason.rewards.format import extract_answer

__all__ = ["box_iou", "iou_reward", "parse_box"]

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
# ``\s*(?:,\s*)?`` rather than ``\s*,?\s*``: adjacent whitespace runs backtrack
# quadratically ("[1" then 40,000 spaces took 34 s); these match in linear time.
_BOX = re.compile(
    rf"[\[(]\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*(?:,\s*)?[\])]"
)
_NUMBER_LIST = re.compile(rf"[\[(]\s*{_NUM}(?:\s*,\s*{_NUM})*\s*(?:,\s*)?[\])]")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The single 4-number box in ``text`` (``[..]`` or ``(..)``), else None.

    None when the text holds no box, more than one bracketed list of numbers, a list of
    another length, a number that overflows a float (``1e999``), or an inverted box
    (x1 < x0 or y1 < y0).
    """
    lists = _NUMBER_LIST.findall(text)
    if len(lists) != 1:
        return None
    match = _BOX.fullmatch(lists[0])
    if match is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in match.groups())
    if not all(map(math.isfinite, (x0, y0, x1, y1))):
        return None
    if x1 < x0 or y1 < y0:
        return None
    return x0, y0, x1, y1


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes, in [0, 1] (0 when both are degenerate, or
    when a coordinate is not finite or the areas overflow a float)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / union if union > 0 else 0.0
    return min(max(iou, 0.0), 1.0) if math.isfinite(iou) else 0.0


def iou_reward(
    completion: str,
    ground_truth: str | Sequence[float],
    *,
    threshold: float | None = None,
    lenient: bool = False,
    **info: Any,
) -> float:
    """IoU between the answer's box and the ground-truth box, in [0, 1].

    Args:
        completion: model output; the box is read from its single ``<answer>`` block (or,
            with ``lenient=True`` and no valid answer block, from the whole completion).
        ground_truth: ``"[x0, y0, x1, y1]"`` or a sequence of four numbers.
        threshold: if set, return 1.0 when IoU >= threshold else 0.0 (e.g. 0.5).
        **info: other per-sample fields; ignored.
    """
    del info
    answer = extract_answer(completion)
    if answer is None:
        if not lenient:
            return 0.0
        answer = completion
    pred = parse_box(answer)
    if isinstance(ground_truth, str):
        gt = parse_box(ground_truth)
    else:
        values = [float(v) for v in ground_truth]
        gt = tuple(values) if len(values) == 4 else None  # type: ignore[assignment]
    if pred is None or gt is None:
        return 0.0
    iou = box_iou(pred, gt)
    if threshold is not None:
        return 1.0 if iou >= threshold else 0.0
    return iou
