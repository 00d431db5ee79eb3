"""Strict format reward and answer extraction; the known reward hacks score 0."""

import pytest

from vlreason.rewards import REWARDS, extract_answer, format_reward, is_strict_format

GOOD = [
    "<think>2 + 1 = 3</think><answer>3</answer>",
    "  \n<think>\nadd them\n</think>\n\n<answer> 3 </answer>\n",
    "<think>a</think> <answer>The red one</answer>",
]

HACKS = {
    "empty answer": "<think>x</think><answer></answer>",
    "whitespace answer": "<think>x</think><answer>  \n </answer>",
    "empty think": "<think> </think><answer>3</answer>",
    "missing think": "<answer>3</answer>",
    "think after answer": "<answer>3</answer><think>x</think>",
    "repeated answer": "<think>x</think><answer>3</answer><answer>4</answer>",
    "repeated think": "<think>x</think><think>y</think><answer>3</answer>",
    "nested answer": "<think>x</think><answer><answer>3</answer></answer>",
    "answer inside think": "<think><answer>3</answer></think><answer>3</answer>",
    "think inside answer": "<think>x</think><answer>3<think>y</think></answer>",
    "text after answer": "<think>x</think><answer>3</answer> Actually 4.",
    "text before think": "Sure! <think>x</think><answer>3</answer>",
    "text between blocks": "<think>x</think> so 3 <answer>3</answer>",
    "answer outside tags": "<think>x</think>3",
    "unclosed answer": "<think>x</think><answer>3",
    "wrong case tags": "<think>x</think><Answer>3</Answer>",
    "spaced tag variant": "<think>x</think><answer>3</answer></ answer>",
    "no tags": "3",
    "empty": "",
}


@pytest.mark.parametrize("text", GOOD)
def test_good_format_scores_one(text):
    assert format_reward(text, "") == 1.0
    assert REWARDS["format"](text, "anything", truncated=False) == 1.0


@pytest.mark.parametrize("name", list(HACKS))
def test_hacks_score_zero(name):
    assert format_reward(HACKS[name], "3") == 0.0, name
    assert not is_strict_format(HACKS[name])


def test_extract_answer():
    assert extract_answer(GOOD[0]) == "3"
    assert extract_answer(GOOD[1]) == "3"
    assert extract_answer(GOOD[2]) == "The red one"
    # a single answer block is enough for extraction (format is scored separately)
    assert extract_answer("<answer>B</answer>") == "B"
    assert extract_answer("<think>x</think><answer>3</answer> Actually 4.") == "3"
    for name in [
        "empty answer",
        "whitespace answer",
        "repeated answer",
        "nested answer",
        "answer inside think",
        "think inside answer",
        "answer outside tags",
        "unclosed answer",
        "wrong case tags",
        "spaced tag variant",
        "no tags",
        "empty",
    ]:
        assert extract_answer(HACKS[name]) is None, name
    assert extract_answer("<think>x</think><answer>multi\nline</answer>") == "multi\nline"
