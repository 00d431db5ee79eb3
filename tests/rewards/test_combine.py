"""Weighted combination, Vision-R1 hard reward, dotted-path loading, registry."""

import sys
import textwrap

import pytest

from vlreason.rewards import (
    REWARDS,
    RewardFn,
    accuracy_reward,
    format_reward,
    get_reward,
    hard_format_and_correct,
    load_reward,
    weighted,
)

GOOD = "<think>3 = 3</think><answer>3</answer>"
NO_THINK = "<answer>3</answer>"
WRONG = "<think>x</think><answer>4</answer>"


def test_vision_r1_hard_reward():
    assert hard_format_and_correct(GOOD, "3") == 1.0
    assert hard_format_and_correct(GOOD, "3", truncated=True) == 0.0
    assert hard_format_and_correct(NO_THINK, "3") == 0.0  # correct but bad format
    assert hard_format_and_correct(WRONG, "3") == 0.0  # good format but wrong
    assert hard_format_and_correct(GOOD + " 4", "3") == 0.0  # text after </answer>
    mc = "<think>x</think><answer>red</answer>"
    assert REWARDS["vision_r1"](mc, "B", choices=["blue", "red"], truncated=False) == 1.0


def test_weighted_components_and_total():
    fn = weighted(format=(format_reward, 0.1), accuracy=(accuracy_reward, 0.9))
    assert fn(GOOD, "3") == pytest.approx(1.0)
    assert fn(NO_THINK, "3") == pytest.approx(0.9)
    assert fn(WRONG, "3") == pytest.approx(0.1)
    assert fn.score_components(NO_THINK, "3") == {"format": 0.0, "accuracy": 1.0}
    total, parts = fn.score(WRONG, "3")
    assert total == pytest.approx(0.1) and parts == {"format": 1.0, "accuracy": 0.0}
    assert fn.total(parts) == pytest.approx(total)
    assert fn.weights == {"format": 0.1, "accuracy": 0.9}
    assert isinstance(fn, RewardFn)
    # info is forwarded to every component
    seen = {}

    def spy(completion, ground_truth, **info):
        seen.update(info)
        return 0.5

    assert weighted(spy=(spy, 2.0))(GOOD, "3", truncated=True) == 1.0
    assert seen == {"truncated": True}
    with pytest.raises(ValueError):
        weighted()
    with pytest.raises(TypeError):
        weighted(bad=(format_reward,))


def test_registry():
    assert set(REWARDS) == {"format", "accuracy", "iou", "vision_r1", "format_accuracy"}
    assert REWARDS["format_accuracy"](NO_THINK, "3") == pytest.approx(0.9)
    assert REWARDS["format_accuracy"].score_components(GOOD, "3") == {
        "format": 1.0,
        "accuracy": 1.0,
    }
    # every registered reward takes the shared keyword info, gives full marks to a correct,
    # well-formed completion and nothing to a bad one
    box = "<think>x</think><answer>[0, 0, 10, 10]</answer>"
    best = {name: (GOOD, "3") for name in REWARDS} | {"iou": (box, "[0, 0, 10, 10]")}
    worst = {"format": ("3", "3"), "accuracy": (WRONG, "3"), "vision_r1": (NO_THINK, "3"),
             "format_accuracy": ("4", "3"), "iou": (box, "[20, 20, 30, 30]")}
    for name, fn in REWARDS.items():
        assert fn(*best[name], truncated=False, choices=None) == 1.0, name
        assert fn(*worst[name], truncated=False, choices=None) == 0.0, name
    assert get_reward("vision_r1") is hard_format_and_correct
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_reward(completion, ground_truth, **info):
                return float(len(completion) < 100)

            def no_info(completion, ground_truth, scale=1.0):
                return scale * float(ground_truth in completion)

            class Holder:
                @staticmethod
                def reward(completion, ground_truth, **info):
                    return 0.25

            NOT_CALLABLE = 3

            def one_arg(completion):
                return 1.0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_load_reward_dotted_path(user_module):
    fn = load_reward("my_rewards:length_reward")
    assert fn(GOOD, "3", truncated=False) == 1.0
    assert load_reward("my_rewards.length_reward")(GOOD, "3") == 1.0
    assert load_reward("my_rewards:Holder.reward")(GOOD, "3") == 0.25
    # a function without **info only gets the info keys it names
    no_info = load_reward("my_rewards:no_info")
    assert no_info(GOOD, "3", truncated=True, scale=2.0) == 2.0
    assert get_reward("my_rewards:length_reward")(GOOD, "3") == 1.0
    # the shipped rewards load by path too
    assert load_reward("vlreason.rewards.format:format_reward") is format_reward


@pytest.mark.parametrize(
    "path,error,match",
    [
        ("", ValueError, "non-empty"),
        ("my_rewards:", ValueError, "bad reward path"),
        (":length_reward", ValueError, "bad reward path"),
        ("nolayout", ValueError, "bad reward path"),
        ("does_not_exist_xyz:fn", ValueError, "cannot import"),
        ("my_rewards:missing", ValueError, "no attribute"),
        ("my_rewards:NOT_CALLABLE", TypeError, "non-callable"),
        ("my_rewards:one_arg", TypeError, "must accept"),
    ],
)
def test_load_reward_errors(user_module, path, error, match):
    with pytest.raises(error, match=match):
        load_reward(path)
