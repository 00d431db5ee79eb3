"""Refuse huge exact integer powers and factorials while math-verify runs.

sympy evaluates ``Integer ** Integer`` exactly: ``10^{10^{10}}`` makes it compute
``10 ** 10_000_000_000`` (a 4 GB integer) in a single C call that holds the GIL, so
no in-process timer can stop it (seen: a reward call that never returned); the
math-verify worker process (:mod:`vlreason.rewards.math_worker`) would be killed at its
limit, and this guard lets it answer at once instead. Inside :func:`guarded` -- and only
in the thread that entered it -- sympy's ``Integer._eval_power`` and ``Rational._eval_power`` raise :class:`TooLarge`
when the exact result would exceed :data:`MAX_POWER_BITS` bits; math-verify cannot
swallow it (it is a ``BaseException``) and the caller scores the comparison as no match.
The same holds for factorial-like functions (``factorial``, ``factorial2``,
``subfactorial``, ``binomial``, ``RisingFactorial``, ``FallingFactorial``; ``gamma`` of an
integer goes through ``factorial``): with an integer argument over
:data:`MAX_FACTORIAL_ARG` they raise :class:`TooLarge` (``(10^{10})!`` ran for minutes in
C multiplications; ``(10^{7})!`` overran a 1 s limit by 7 s).
Outside :func:`guarded` sympy behaves exactly as installed (the wrappers only read a
thread-local flag).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["MAX_POWER_BITS", "TooLarge", "guarded"]

MAX_POWER_BITS = 1 << 16
"""Largest exact power computed (65,536 bits, about 19,700 decimal digits): small enough that
sympy's gcd and arithmetic on it stay in milliseconds (two million-digit powers in one
fraction kept igcd busy for over a minute)."""

MAX_FACTORIAL_ARG = 5_000
"""Largest integer argument of a factorial-like function evaluated (5000! has 16,326 digits)."""

_FACTORIALS = (
    "factorial", "factorial2", "subfactorial", "binomial", "RisingFactorial", "FallingFactorial"
)

_state = threading.local()
_install_lock = threading.Lock()
_installed = False


class TooLarge(BaseException):
    """An exact power over :data:`MAX_POWER_BITS` bits was refused."""


def _too_large(base: Any, expt: Any) -> bool:
    """Whether ``base ** expt`` (sympy Rationals) would exceed :data:`MAX_POWER_BITS`."""
    p, q = getattr(expt, "p", None), getattr(expt, "q", None)
    if not isinstance(p, int) or not isinstance(q, int) or q == 0:
        return False
    bits = max(abs(int(base.p)).bit_length(), abs(int(base.q)).bit_length())
    if bits <= 1:  # 0, 1, -1 (and their inverses) stay small
        return False
    return (abs(p) // q) * bits > MAX_POWER_BITS


def _wrap(original: Any) -> Any:
    def _eval_power(self: Any, expt: Any) -> Any:
        if getattr(_state, "depth", 0) and _too_large(self, expt):
            raise TooLarge(f"power with about {expt} * {abs(int(self.p)).bit_length()} bits")
        return original(self, expt)

    _eval_power.__wrapped__ = original  # type: ignore[attr-defined]
    _eval_power.__doc__ = original.__doc__
    return _eval_power


def _wrap_eval(cls: Any) -> None:
    original = cls.__dict__["eval"].__func__  # a classmethod

    def eval(klass: Any, *args: Any) -> Any:  # noqa: A001 - sympy's name
        if getattr(_state, "depth", 0):
            for arg in args:
                p = getattr(arg, "p", None)
                if isinstance(p, int) and getattr(arg, "q", None) == 1 and abs(p) > MAX_FACTORIAL_ARG:
                    raise TooLarge(f"{klass.__name__} of {p}")
        return original(klass, *args)

    eval.__wrapped__ = original  # type: ignore[attr-defined]
    cls.eval = classmethod(eval)


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        from sympy.core.numbers import Integer, Rational
        from sympy.functions.combinatorial import factorials

        for cls in (Rational, Integer):
            cls._eval_power = _wrap(cls.__dict__["_eval_power"])
        for name in _FACTORIALS:
            _wrap_eval(getattr(factorials, name))
        _installed = True


@contextmanager
def guarded() -> Iterator[None]:
    """Within this block (in this thread), sympy refuses exact powers over the limit."""
    _install()
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
