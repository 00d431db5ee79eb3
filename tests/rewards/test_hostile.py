"""Hostile completions: every registered reward returns a finite number, in bounded time
and bounded memory, and never raises.

Bounds asserted per reward call (see ``_score``):

- wall clock: at most ``timeout_s + SLACK_S`` seconds, where ``timeout_s`` is the
  math-verify time limit passed through ``info`` (the registry rewards take it as
  ``**info``) and ``SLACK_S = 4`` s covers everything outside math-verify on a loaded
  2-core machine (regexes over a megabyte, killing and reaping a worker past its limit).
  The default limit (5 s) is checked once on the slowest known answer, ``10^10^10^10``.
  The math-verify worker process is started before, untimed, in a fixture.
- memory: tracemalloc peak (Python allocations only; sympy's own C memory is not seen)
  at most ``BASE_BYTES + PER_CHAR_BYTES * len(completion)`` = 32 MiB + 16 bytes per
  character (a str takes up to 4 bytes a character, and a few copies are made: strip,
  tag search, the answer slice).

Found and fixed with these tests: adjacent ``\\s*`` runs in the tag, choice-letter and box
regexes backtracked quadratically ("<" followed by 40,000 spaces: 68 s in ``format``;
"[1" then 40,000 spaces: 34 s in ``iou``), a megabyte answer used ~190 MB inside
math-verify (answers over 1000 characters now skip it), a 400,000-digit number took 15 s
to become a Fraction (now a Decimal), ``1e999`` box coordinates reached the IoU arithmetic
as ``inf``, and -- worst -- sympy computed ``10 ** 10**10`` and ``(10^{10})!`` exactly in C
calls that hold the GIL, so neither the SIGALRM limit nor the worker-thread limit could
stop them (a call that never returned; vlreason.rewards.power_guard now refuses them);
the first math check of a process imported sympy under the time limit, so a timeout
there broke every later check; and an interrupt raised into sympy by the in-process
``SIGALRM`` limit could leave its state broken: CI once hung for over an hour on "40 nested
braces". math-verify now runs in a worker process that is killed past its limit
(vlreason.rewards.math_worker; tests/rewards/test_math_worker.py).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlreason.rewards import REWARDS

SLACK_S = 4.0
FAST_TIMEOUT_S = 0.3  # math-verify limit used by the many-case tests below
BASE_BYTES = 32 * 2**20
PER_CHAR_BYTES = 16
MB = 2**20

GROUND_TRUTHS = ["3", "10^{10^{10}}", "\\frac{1}{2}", "[0, 0, 10, 10]", "B", "x^2+1", "red"]
# The named cases are scored against a mathematical, a box and a choice ground truth.
CASE_GROUND_TRUTHS = ["10^{10^{10}}", "[0, 0, 10, 10]", "B"]


def _wrap(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


# name -> completion; each is scored against every ground truth above by every reward.
HOSTILE = {
    "tower of powers": _wrap("10^10^10^10"),
    "python power tower": _wrap("9**9**9**9"),
    "factorial of a power": _wrap("(10^{10})!"),
    "factorial of 10^7": _wrap("(10^{7})!"),
    "huge binomial": _wrap("\\binom{10^{9}}{10^{8}}"),
    "two million-digit powers in a fraction": _wrap("\\frac{10^{10^6}}{3^{10^6}}"),
    "gamma of a power": _wrap("\\Gamma(10^{10})"),
    "negative power tower": _wrap("2^{-10^{10}}"),
    "huge exponent literal": _wrap("1e99999999"),
    "400k-digit number": _wrap("9" * 400_000),
    "5000 nested parentheses": _wrap("(" * 5000 + "1" + ")" * 5000),
    "300 nested fractions": _wrap("\\frac{" * 300 + "1" + "}{2}" * 300),
    "12 nested fractions (under the length cap)": _wrap("\\frac{" * 12 + "1" + "}{2}" * 12),
    "40 nested braces (under the length cap)": _wrap("{" * 40 + "1" + "}" * 40),
    "megabyte sum": _wrap("1+" * 500_000 + "1"),
    "megabyte of text": "x" * MB,
    "5000 think and answer tags": "<think>" * 5000 + "<answer>" * 5000 + "</answer>" * 5000,
    "null bytes": "<think>\x00</think><answer>3\x00</answer>\x00",
    "RTL and zero-width marks": _wrap("\u202e3\u200f\u200b\u2066"),
    "lone surrogates": "<think>\ud800</think><answer>\udfff3\ud800</answer>",
    "'<' then 100k spaces": "<" + " " * 100_000 + "x",
    "'[1' then 100k spaces": _wrap("[1" + " " * 100_000 + "x"),
    "letter then 100k spaces": _wrap("A" + " " * 100_000 + "x"),
    "overflowing box": _wrap("[1e999, 0, 1e999, 5]"),
    "box spanning all floats": _wrap("[-1e308, -1e308, 1e308, 1e308]"),
    "100k open boxed": "\\boxed{" * 100_000,
    "20k unclosed answer tags": "<answer>" * 20_000,
}


def _score(name: str, completion: str, ground_truth: str, timeout_s: float, **info) -> float:
    """Call one registered reward under tracemalloc; assert the time and memory bounds."""
    fn = REWARDS[name]
    tracemalloc.start()
    start = time.monotonic()
    try:
        value = fn(completion, ground_truth, timeout_s=timeout_s, **info)
    finally:
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    where = f"reward {name!r} on {completion[:60]!r}... ({len(completion)} chars) vs {ground_truth!r}"
    assert isinstance(value, float) and math.isfinite(value), f"{where}: returned {value!r}"
    assert 0.0 <= value <= 1.0, f"{where}: {value} outside [0, 1]"
    assert elapsed <= timeout_s + SLACK_S, f"{where}: took {elapsed:.2f} s"
    limit = BASE_BYTES + PER_CHAR_BYTES * len(completion)
    assert peak <= limit, f"{where}: tracemalloc peak {peak / MB:.1f} MiB > {limit / MB:.1f} MiB"
    return value


@pytest.fixture(autouse=True, scope="module")
def _math_worker_started():
    """The math-verify worker (a process that imports sympy: seconds) starts once, untimed;
    the per-call bounds below are for every call after that."""
    from vlreason.rewards import math_worker

    math_worker.warm_up()


def test_registry_holds_the_rewards_under_test():
    assert {"format", "accuracy", "iou", "vision_r1", "format_accuracy"} <= set(REWARDS)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_completion_is_scored_finite_fast_and_small(case):
    completion = HOSTILE[case]
    for name in REWARDS:
        for ground_truth in CASE_GROUND_TRUTHS:
            # lenient (free-text fallback) is a path of accuracy and iou themselves; the
            # combined rewards reach it through accuracy (and the random test covers both)
            for lenient in (False, True) if name in ("accuracy", "iou") else (False,):
                _score(name, completion, ground_truth, FAST_TIMEOUT_S, lenient=lenient)


def test_default_time_limit_bounds_the_slowest_known_answer():
    """Under the default math-verify limit (5 s) a power tower still returns 0 in time."""
    start = time.monotonic()
    value = REWARDS["accuracy"](_wrap("10^10^10^10"), "10^{10^{10}}")
    assert value == 0.0
    assert time.monotonic() - start <= 5.0 + SLACK_S


@pytest.mark.parametrize("answer", ["10^{10^{10}}", "(10^{10})!", "\\frac{10^{10^6}}{3^{10^6}}"])
def test_time_limit_holds_off_the_main_thread(answer):
    """From a thread other than the main one the limit holds the same way (the check runs
    in the worker process either way); sympy's exact powers and factorials, which hold the
    GIL, are refused inside the worker (vlreason.rewards.power_guard)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        start = time.monotonic()
        value = pool.submit(
            REWARDS["accuracy"], _wrap(answer), "3", timeout_s=FAST_TIMEOUT_S
        ).result()
    assert value == 0.0
    assert time.monotonic() - start <= FAST_TIMEOUT_S + SLACK_S


@pytest.mark.parametrize(
    ("answer", "ground_truth"),
    [("2^{10}", "1024"), ("5!", "120"), ("\\binom{5}{2}", "10"), ("10^{100}", "10^{100}"),
     ("2^{64}", "18446744073709551616"), ("\\frac{2^{10}}{4}", "256")],
)
def test_guard_keeps_ordinary_powers_and_factorials(answer, ground_truth):
    assert REWARDS["accuracy"](_wrap(answer), ground_truth) == 1.0


def test_a_timeout_during_the_first_check_does_not_break_later_checks():
    """In a fresh interpreter the first math check used to import sympy under the time
    limit; an alarm inside that import left sympy half-initialised and every later math
    answer scored 0 (``2^{10}`` vs ``1024`` included). The imports now happen untimed."""
    code = (
        "from vlreason.rewards import REWARDS\n"
        "hostile = '<think>x</think><answer>10^10^10^10</answer>'\n"
        "for name in REWARDS:\n"
        "    REWARDS[name](hostile, '10^{10^{10}}', timeout_s=0.3)\n"
        "print(REWARDS['accuracy']('<think>x</think><answer>2^{10}</answer>', '1024'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "1.0", done.stdout + done.stderr


FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "< /answer >", "<ANSWER>", "<", ">",
    "\\frac{", "}", "{", "(", ")", "[", "]", "^", "**", "!", "9", "10", "1e999", "-", ".",
    ",", " ", "\n", "\t", "\x00", "\u202e", "\u200f", "\ud800", "\udfff", "\\boxed{", "$",
    "\\sqrt{", "\\infty", "nan", "inf", "=", "/", "0", "A", "(B)", "\\left(", "\\right)",
    "\U0001f600", "\\", "%", "\\begin{pmatrix}", "&", "\\\\",
]

_pieces = st.lists(
    st.sampled_from(FRAGMENTS) | st.text(max_size=8) | st.characters(categories=["Cs"]),
    max_size=30,
).map("".join)


@st.composite
def completions(draw) -> str:
    """A random mix of hostile fragments, sometimes repeated many times, sometimes
    inside a well-formed think/answer block so that it reaches the answer checkers."""
    body = draw(_pieces) * draw(st.sampled_from([1, 1, 2, 50, 3000]))
    return _wrap(body) if draw(st.booleans()) else body


@settings(
    max_examples=40,
    deadline=timedelta(seconds=60),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    completion=completions(),
    ground_truth=st.sampled_from(GROUND_TRUTHS) | st.text(max_size=20),
    choices=st.none() | st.lists(st.text(max_size=10), max_size=4),
    truncated=st.booleans(),
    lenient=st.booleans(),
)
def test_random_hostile_completions(completion, ground_truth, choices, truncated, lenient):
    for name in REWARDS:
        _score(
            name,
            completion,
            ground_truth,
            FAST_TIMEOUT_S,
            choices=choices,
            truncated=truncated,
            lenient=lenient,
        )
    # and the checker still works afterwards (no state left broken by an interrupted call)
    assert REWARDS["accuracy"](_wrap("2^{10}"), "1024", timeout_s=5.0) == 1.0
