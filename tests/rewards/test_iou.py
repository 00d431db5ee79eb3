"""Box IoU reward."""

import pytest

from vlreason.rewards import box_iou, iou_reward, parse_box


def wrap(answer: str) -> str:
    return f"<think>look</think><answer>{answer}</answer>"


def test_hand_worked_iou():
    # [0,0,10,10] vs [5,5,15,15]: inter 25, union 100 + 100 - 25 = 175 -> 1/7
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_reward_values():
    assert iou_reward(wrap("[0, 0, 10, 10]"), "[5, 5, 15, 15]") == pytest.approx(1 / 7)
    assert iou_reward(wrap("[0,0,10,10]"), [0, 0, 10, 10]) == 1.0
    assert (
        iou_reward(wrap('{"bbox_2d": [0, 0, 10, 10], "label": "cat (small)"}'), "[0,0,10,10]")
        == 1.0
    )
    assert iou_reward(wrap("[0, 0, 10, 10]"), "[5, 5, 15, 15]", threshold=0.5) == 0.0
    assert iou_reward(wrap("[0, 0, 10, 10]"), "[0, 0, 10, 11]", threshold=0.5) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        wrap("[0, 0, 10, 10] [5, 5, 15, 15]"),  # several boxes
        wrap("[0, 0, 10]"),
        wrap("[0, 0, 10, 10, 3]"),
        wrap("[10, 10, 0, 0]"),  # inverted
        wrap("the cat"),
        "[0, 0, 10, 10]",  # outside the answer block
        "<think>x</think><answer></answer>",
    ],
)
def test_bad_answers_score_zero(completion):
    assert iou_reward(completion, "[0, 0, 10, 10]") == 0.0


def test_lenient_and_parse():
    assert iou_reward("box: [0, 0, 10, 10]", "[0,0,10,10]", lenient=True) == 1.0
    assert parse_box("(1.5, 2, 3e1, 40)") == (1.5, 2.0, 30.0, 40.0)
    assert parse_box("[1, 2, 3, 4,]") == (1.0, 2.0, 3.0, 4.0)
    assert parse_box("no box") is None
