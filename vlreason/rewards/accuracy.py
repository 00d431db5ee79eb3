"""Rule-based answer checking: multiple choice, numbers, math (math-verify), short text.

:func:`accuracy_reward` takes the content of the single ``<answer>`` block (see
:func:`~vlreason.rewards.format.extract_answer`) and compares it with the ground truth. The
answer block must contain the answer itself, not prose around it: ``"not 3"``, ``"13"``,
``"3 or 4"`` and ``"The answer is 3"`` do not match ``3`` (no substring or "last number"
matching). Only ``lenient=True`` (for scoring models that were never trained on the tag
format) falls back to the free text of the completion.

Comparison, first rule that applies wins:

1. **Multiple choice**, when the ground truth is a choice letter (``B``, ``(B)``, ``B.``,
   ``b``) or, with ``choices`` given, one of the choice texts. The prediction must name the
   same choice: a letter in one of those forms, the choice text, or ``"B. <choice text>"``
   with the matching text. Anything else scores 0.
2. **Normalised text**: equal after lower-casing, collapsing whitespace and stripping
   surrounding quotes and a trailing period (``" Red. "`` == ``"red"``).
3. **Numbers**: both sides plain numbers -> exact decimal comparison
   (``3 == 3.0 == 3. == +3``, ``1,000 == 1000`` for well-formed thousands separators,
   number words ``zero`` .. ``twenty``). Two different plain numbers score 0 immediately.
4. **Math** (ground truth contains a digit, a backslash or one of ``^ = + * /``):
   ``math_verify.verify(parse(gt), parse(pred))`` with both sides read as one LaTeX
   expression (``$...$``), under a wall-clock limit ``timeout_s`` (timeout -> 0).
   Letters-only ground truths never reach sympy (otherwise ``"der"`` would equal ``"red"``
   as a product of symbols), and neither does a side longer than :data:`MAX_MATH_CHARS`
   characters (no real answer is that long; parsing one costs memory and time that the
   time limit alone does not bound: a megabyte answer took ~190 MB in math-verify).

Time limit: math-verify runs in a worker process (:mod:`vlreason.rewards.math_worker`)
that is killed and replaced when a check runs past ``timeout_s``; the answer then scores
0. Nothing in this process is interrupted, so no sympy state is left half-updated, and a
C call that holds the GIL (``10 ** 10**10``) stalls only the worker. Works the same from
any thread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from vlreason.rewards import math_worker
from vlreason.rewards.format import extract_answer

__all__ = ["MAX_MATH_CHARS", "accuracy_reward", "answers_match", "math_equal"]

MAX_MATH_CHARS = 1000
"""Longest answer (either side, in characters) that is handed to math-verify; longer ones
score 0 unless an earlier rule (choice, text, number) matched. In lenient mode the free
text searched for an answer is cut to its last ``MAX_LENIENT_CHARS`` characters."""
MAX_LENIENT_CHARS = 8000

# No two whitespace runs are adjacent in these patterns (``\s*\)?\s*`` backtracks
# quadratically on a letter followed by a long run of spaces); they match in linear time.
_LETTER = re.compile(r"\(?\s*([A-Za-z])(?:\s*\))?\s*[.:)]?")
_LETTER_WITH_TEXT = re.compile(r"\(?\s*([A-Za-z])(?:\s*\))?(?:\s*[.:)])?\s+(.+)", re.DOTALL)
_CHOICE_PREFIX = re.compile(r"\(?\s*([A-Za-z])(?:\s*\))?\s*[.:)]\s*(.*)", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_MATHY = re.compile(r"[\d\\^=+*/]")
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANY_TAG = re.compile(r"<\s*(?:/\s*)?(?:think|answer)\s*>", re.IGNORECASE)
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


# --------------------------------------------------------------------------- normalisers


def _norm_text(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding quotes / a trailing period."""
    text = " ".join(text.replace("\u2212", "-").lower().split())
    text = text.strip("\"'`")
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    return text.strip()


def _parse_number(text: str) -> Decimal | None:
    """Exact value of a plain number ("3", "3.0", "3.", "-1,234.5", "three"), else None.

    A ``Decimal`` holds a plain decimal number exactly and compares exactly (``3 == 3.0``);
    unlike a ``Fraction`` it is built in linear time (``Fraction(Decimal(s))`` of a
    400,000-digit answer took 15 s).
    """
    t = text.strip().replace("\u2212", "-").strip("$").strip()
    if t.lower() in _NUMBER_WORDS:
        return Decimal(_NUMBER_WORDS[t.lower()])
    if t.endswith(".") and t[:-1].endswith("."):  # "3.." is not a number
        return None
    if _THOUSANDS.fullmatch(t):
        t = t.replace(",", "")
    elif not _NUMBER.fullmatch(t):
        if t.endswith(".") and _NUMBER.fullmatch(t[:-1]):  # trailing sentence period
            t = t[:-1]
        else:
            return None
    try:
        return Decimal(t)
    except (InvalidOperation, ValueError):
        return None


def _as_choices(choices: Any) -> list[str] | None:
    if choices is None:
        return None
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            return None
    if not isinstance(choices, Sequence) or isinstance(choices, str):
        return None
    return [str(c) for c in choices]


def _choice_text(choice: str, index: int) -> str:
    """Normalised text of a choice, dropping its own "A." / "(A)" prefix if it has one."""
    m = _CHOICE_PREFIX.fullmatch(choice.strip())
    if m and m.group(1).upper() == chr(ord("A") + index) and m.group(2).strip():
        return _norm_text(m.group(2))
    return _norm_text(choice)


def _choice_letter(text: str, choices: list[str] | None) -> str | None:
    """The choice a string names ("B", "(b)", "B.", choice text, "B. text"), else None."""
    t = text.strip()
    m = _LETTER.fullmatch(t)
    if m:
        letter = m.group(1).upper()
        if choices is None or ord(letter) - ord("A") < len(choices):
            return letter
        return None
    if not choices:
        return None
    texts = [_choice_text(c, i) for i, c in enumerate(choices)]
    m = _LETTER_WITH_TEXT.fullmatch(t)
    if m:
        index = ord(m.group(1).upper()) - ord("A")
        if 0 <= index < len(texts) and _norm_text(m.group(2)) == texts[index]:
            return m.group(1).upper()
    norm = _norm_text(t)
    matches = [i for i, c in enumerate(texts) if c == norm]
    return chr(ord("A") + matches[0]) if len(matches) == 1 else None


def _as_latex(text: str) -> str:
    """Read a whole answer as ONE LaTeX math expression.

    All math delimiters (``$``, ``$$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``) are removed and
    the text is wrapped in one ``$...$``, so math-verify cannot pick a single expression out
    of surrounding prose: ``"not $3$"`` becomes ``$not 3$``, which is not 3.
    """
    t = re.sub(r"(?<!\\)\$", " ", text)
    t = re.sub(r"\\[()\[\]]", " ", t)
    t = re.sub(r"(?<!\\)%", r"\\%", t)  # "%" starts a LaTeX comment
    return f"${' '.join(t.split())}$"


def math_equal(pred: str, ground_truth: str, *, timeout_s: float = 5.0) -> bool:
    """math-verify equivalence of two answers read as LaTeX, within ``timeout_s`` (else
    False); False without calling math-verify when a side exceeds :data:`MAX_MATH_CHARS`."""
    if len(pred) > MAX_MATH_CHARS or len(ground_truth) > MAX_MATH_CHARS:
        return False
    return bool(math_worker.verify(_as_latex(pred), _as_latex(ground_truth), timeout_s=timeout_s))


# --------------------------------------------------------------------------- reward


def answers_match(
    pred: str,
    ground_truth: str,
    *,
    choices: Sequence[str] | None = None,
    timeout_s: float = 5.0,
) -> bool:
    """Whether an extracted answer equals the ground truth (rules 1-4 of the module doc)."""
    gt = str(ground_truth).strip()
    pred = pred.strip()
    if not gt or not pred:
        return False
    choice_list = _as_choices(choices)

    gt_letter = _choice_letter(gt, choice_list)
    if gt_letter is not None:
        return _choice_letter(pred, choice_list) == gt_letter

    if _norm_text(pred) == _norm_text(gt):
        return True

    gt_num, pred_num = _parse_number(gt), _parse_number(pred)
    if gt_num is not None and pred_num is not None:
        return gt_num == pred_num

    if _MATHY.search(gt) is None:
        return False
    return math_equal(pred, gt, timeout_s=timeout_s)


def _lenient_answer(completion: str) -> str:
    """Free-text fallback: the last ``\\boxed{...}`` content, else the last non-empty line."""
    boxed = _BOXED.findall(completion)
    if boxed:
        return boxed[-1].strip()
    lines = [line.strip() for line in _ANY_TAG.sub(" ", completion).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def accuracy_reward(
    completion: str,
    ground_truth: str,
    *,
    choices: Sequence[str] | None = None,
    timeout_s: float = 5.0,
    lenient: bool = False,
    **info: Any,
) -> float:
    """1.0 if the completion's answer equals ``ground_truth``, else 0.0.

    Args:
        completion: the model output; its single ``<answer>`` block is checked.
        ground_truth: the reference answer (letter, number, LaTeX, or short text).
        choices: the options of a multiple-choice question (list, or a JSON list string),
            in letter order A, B, ...; lets the answer name a choice by its text.
        timeout_s: wall-clock limit of the math-verify check; a timeout scores 0.
        lenient: without a valid answer block, use the last ``\\boxed{}`` or the last line
            of the completion, and let math-verify search the whole text for the answer.
        **info: other per-sample fields (e.g. ``truncated``); ignored here.
    """
    del info
    answer = extract_answer(completion)
    if answer is not None:
        return (
            1.0
            if answers_match(answer, ground_truth, choices=choices, timeout_s=timeout_s)
            else 0.0
        )
    if not lenient:
        return 0.0
    candidate = _lenient_answer(completion)
    if candidate and answers_match(candidate, ground_truth, choices=choices, timeout_s=timeout_s):
        return 1.0
    gt = str(ground_truth).strip()
    if gt and _MATHY.search(gt) and _choice_letter(gt, _as_choices(choices)) is None:
        text = _ANY_TAG.sub(" ", completion[-MAX_LENIENT_CHARS:])
        found = math_worker.verify(text, _as_latex(gt), free_text=True, timeout_s=timeout_s)
        return 1.0 if found else 0.0
    return 0.0
