"""Accuracy reward: letters, numbers, math-verify, short text, hacks, the time limit."""

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vlreason.rewards import accuracy_reward, answers_match, math_worker

# Parsing this as nested sets takes sympy minutes (evalf recurses through every level).
SLOW_ANSWER = "{" * 40 + "1" + "}" * 40
SLOW_TRUTH = "10^{10^{10}}"


def wrap(answer: str) -> str:
    return f"<think>work it out</think><answer>{answer}</answer>"


@pytest.mark.parametrize(
    "pred,gt",
    [
        ("3", "3"),
        ("3.0", "3"),
        (" 3 ", "3"),
        ("3.", "3"),
        ("+3", "3"),
        ("1,000", "1000"),
        ("1,234.50", "1234.5"),
        ("three", "3"),
        ("-3", "\u22123"),  # unicode minus
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("$\\frac{1}{2}$", "0.5"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2"),
        ("x^2 + 2x + 1", "(x+1)^2"),
        ("50\\%", "50%"),
        ("Red", "red"),
        ("  light   blue. ", "Light Blue"),
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "(B)"),
    ],
)
def test_correct_scores_one(pred, gt):
    assert accuracy_reward(wrap(pred), gt) == 1.0, (pred, gt)


@pytest.mark.parametrize(
    "pred,gt",
    [
        ("13", "3"),  # substring
        ("3", "13"),
        ("not 3", "3"),
        ("not $3$", "3"),
        ("3 or 4", "3"),
        ("$3$ or $4$", "3"),
        ("The answer is 3", "3"),
        ("2", "3"),
        ("1,00", "100"),  # malformed thousands separator
        ("0.3333", "\\frac{1}{3}"),
        ("der", "red"),  # would equal "red" as a product of sympy symbols
        ("dark red", "red"),
        ("not red", "red"),
        ("C", "B"),
        ("B or C", "B"),
        ("BC", "B"),
        ("A dog", "A"),
        ("3", "B"),
    ],
)
def test_wrong_scores_zero(pred, gt):
    assert accuracy_reward(wrap(pred), gt) == 0.0, (pred, gt)


@pytest.mark.parametrize(
    "completion",
    [
        "<think>x</think><answer></answer>",
        "<think>x</think><answer>   </answer>",
        "<think>x</think><answer>3</answer><answer>3</answer>",
        "<think>x</think><answer><answer>3</answer></answer>",
        "<think>x</think>3",
        "The answer is 3",
        "\\boxed{3}",
    ],
)
def test_answer_must_be_in_a_single_answer_block(completion):
    assert accuracy_reward(completion, "3") == 0.0


def test_lenient_free_text():
    assert accuracy_reward("so the result is \\boxed{3}", "3", lenient=True) == 1.0
    assert accuracy_reward("Therefore x equals 1/2", "0.5", lenient=True) == 1.0
    assert accuracy_reward("The answer is\nB", "B", lenient=True) == 1.0
    assert accuracy_reward("so the result is \\boxed{4}", "3", lenient=True) == 0.0


def test_multiple_choice_with_choices():
    choices = ["blue", "red", "green"]
    assert accuracy_reward(wrap("red"), "B", choices=choices) == 1.0
    assert accuracy_reward(wrap("B. red"), "B", choices=choices) == 1.0
    assert accuracy_reward(wrap("(b) Red"), "red", choices=choices) == 1.0
    assert accuracy_reward(wrap("B"), "red", choices=choices) == 1.0
    assert accuracy_reward(wrap("A. red"), "B", choices=choices) == 0.0  # letter and text disagree
    assert accuracy_reward(wrap("green"), "B", choices=choices) == 0.0
    assert accuracy_reward(wrap("D"), "B", choices=choices) == 0.0
    # choices carrying their own prefixes, and a JSON string
    assert accuracy_reward(wrap("red"), "B", choices=["A. blue", "B. red"]) == 1.0
    assert accuracy_reward(wrap("red"), "B", choices='["blue", "red"]') == 1.0


def test_info_is_ignored():
    assert accuracy_reward(wrap("3"), "3", truncated=True, source="x") == 1.0


def test_math_verify_works_in_worker_threads():
    # math-verify's own signal-based timeout raises ValueError outside the main thread
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(accuracy_reward, wrap("\\frac{1}{2}"), "0.5") for _ in range(4)]
        assert [f.result() for f in futures] == [1.0] * 4


def test_timeout_returns_zero_quickly():
    math_worker.warm_up()
    start = time.monotonic()
    assert accuracy_reward(wrap(SLOW_ANSWER), SLOW_TRUTH, timeout_s=0.3) == 0.0
    assert time.monotonic() - start < 0.3 + math_worker.ZYGOTE_GRACE_S
    # plain numbers never reach math-verify; and the checker works again after the kill
    assert accuracy_reward(wrap("3.0"), "3", timeout_s=0.3) == 1.0
    assert accuracy_reward(wrap("\\frac{1}{2}"), "0.5", timeout_s=5.0) == 1.0


def test_timeout_in_a_worker_thread_returns_zero_quickly():
    math_worker.warm_up()
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(accuracy_reward, wrap(SLOW_ANSWER), SLOW_TRUTH, timeout_s=0.3).result()
    assert result == 0.0
    assert time.monotonic() - start < 0.3 + math_worker.ZYGOTE_GRACE_S


def test_a_timeout_leaves_the_callers_own_timer_alone():
    """Nothing in this process is interrupted: an alarm the caller set still fires, once,
    with the caller's handler, while a check times out in the worker."""
    fired = []

    def handler(*args):
        fired.append(1)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        assert accuracy_reward(wrap("2^{10}"), "1024") == 1.0
        assert accuracy_reward(wrap(SLOW_ANSWER), SLOW_TRUTH, timeout_s=0.2) == 0.0
        time.sleep(0.8)
        assert fired == [1]
        assert signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_checker_errors_score_zero(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(math_worker, "mv_equal_unguarded", boom)
    assert math_worker.mv_equal("$\\frac{1}{2}$", "$0.5$") is False


def test_answers_match_edge_cases():
    assert not answers_match("", "3")
    assert not answers_match("3", "")
    assert answers_match("3", 3)  # non-string ground truth
