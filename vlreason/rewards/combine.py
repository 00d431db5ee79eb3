"""Combining rewards, the Vision-R1 hard reward, user rewards by dotted path, the registry.

Every reward is a :class:`RewardFn`: ``fn(completion: str, ground_truth: str, **info) -> float``.
``info`` carries per-sample fields such as ``choices`` (multiple-choice options) and
``truncated`` (the completion hit the length limit); a reward ignores the keys it does not
use, so a trainer can pass the same ``info`` to every reward.

Registry (:data:`REWARDS`):

| name              | value                                                               |
|-------------------|---------------------------------------------------------------------|
| ``format``        | 1 if strict ``<think>..</think><answer>..</answer>``, else 0        |
| ``accuracy``      | 1 if the answer block matches the ground truth, else 0              |
| ``iou``           | IoU of the answer's box with the ground-truth box, in [0, 1]        |
| ``vision_r1``     | 1 iff format AND accuracy AND not truncated (Vision-R1 hard reward) |
| ``format_accuracy`` | 0.1 * format + 0.9 * accuracy (a correct answer dominates; the    |
|                   | format term only breaks ties; components logged separately)         |
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from vlreason.rewards.accuracy import accuracy_reward
from vlreason.rewards.format import format_reward, is_strict_format
from vlreason.rewards.iou import iou_reward

__all__ = [
    "REWARDS",
    "RewardFn",
    "WeightedReward",
    "get_reward",
    "hard_format_and_correct",
    "load_reward",
    "weighted",
]


@runtime_checkable
class RewardFn(Protocol):
    """``(completion, ground_truth, **info) -> float``; pure, no I/O, never raises on bad
    model output (it scores 0 instead)."""

    def __call__(self, completion: str, ground_truth: str, **info: Any) -> float: ...


class WeightedReward:
    """``total = sum_k weight_k * component_k(completion, ground_truth, **info)``.

    Calling it returns the total. :meth:`score_components` returns the unweighted component
    scores by name (for logging, e.g. format and accuracy rates separately), and
    :meth:`score` both at once, computing each component once.
    """

    def __init__(self, components: Mapping[str, tuple[RewardFn, float]]) -> None:
        if not components:
            raise ValueError("weighted() needs at least one component")
        for name, pair in components.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and callable(pair[0])):
                raise TypeError(
                    f"component {name!r} must be a (reward_fn, weight) pair, got {pair!r}"
                )
        self.components: dict[str, tuple[RewardFn, float]] = {
            name: (fn, float(weight)) for name, (fn, weight) in components.items()
        }

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, (_, weight) in self.components.items()}

    def score_components(self, completion: str, ground_truth: str, **info: Any) -> dict[str, float]:
        """Unweighted score of every component, keyed by its name."""
        return {
            name: float(fn(completion, ground_truth, **info))
            for name, (fn, _) in self.components.items()
        }

    def score(
        self, completion: str, ground_truth: str, **info: Any
    ) -> tuple[float, dict[str, float]]:
        """``(total, components)``."""
        parts = self.score_components(completion, ground_truth, **info)
        return self.total(parts), parts

    def total(self, parts: Mapping[str, float]) -> float:
        """Weighted sum of already computed component scores."""
        return float(sum(weight * parts[name] for name, (_, weight) in self.components.items()))

    def __call__(self, completion: str, ground_truth: str, **info: Any) -> float:
        return self.score(completion, ground_truth, **info)[0]

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{name}=({getattr(fn, '__name__', fn)!s}, {w})"
            for name, (fn, w) in self.components.items()
        )
        return f"weighted({inner})"


def weighted(**components: tuple[RewardFn, float]) -> WeightedReward:
    """``weighted(format=(format_reward, 0.1), accuracy=(accuracy_reward, 0.9))``."""
    return WeightedReward(components)


def hard_format_and_correct(
    completion: str, ground_truth: str, *, truncated: bool = False, **info: Any
) -> float:
    """Vision-R1 "hard formatting result reward".

    1.0 only if the completion was not truncated at the length limit, has the strict
    ``<think>...</think><answer>...</answer>`` format, and its answer is correct
    (:func:`~vlreason.rewards.accuracy.accuracy_reward`, which receives ``choices`` etc.
    from ``info``); else 0.0.
    """
    if truncated or not is_strict_format(completion):
        return 0.0
    return accuracy_reward(completion, ground_truth, **info)


def _accepts_info(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so that ``info`` keys it does not declare are dropped."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn
    named = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }

    def reward(completion: str, ground_truth: str, **info: Any) -> float:
        return fn(completion, ground_truth, **{k: v for k, v in info.items() if k in named})

    reward.__name__ = getattr(fn, "__name__", "reward")
    reward.__doc__ = fn.__doc__
    reward.__wrapped__ = fn  # type: ignore[attr-defined]
    return reward


def load_reward(path: str) -> RewardFn:
    """Resolve a user reward from ``"package.module:function"`` (or ``"package.module.function"``).

    The target must be callable as ``fn(completion: str, ground_truth: str, **info) -> float``.
    A function without ``**info`` is accepted: it is wrapped so that it only receives the
    ``info`` keys it names. Attribute paths after the colon may be dotted
    (``"pkg.mod:Class.method"``).

    Raises:
        ValueError: malformed path, module not importable, or attribute missing.
        TypeError: the target is not callable, or cannot take (completion, ground_truth).
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(
            f"reward path must be a non-empty 'package.module:function' string, got {path!r}"
        )
    path = path.strip()
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path or ":" in attr_path:
        raise ValueError(f"bad reward path {path!r}: expected 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for reward {path!r}: {e}") from e
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"reward {path!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise TypeError(f"reward {path!r} resolves to a non-callable {type(target).__name__}")
    try:
        inspect.signature(target).bind("completion", "ground_truth")
    except TypeError as e:
        raise TypeError(
            f"reward {path!r} must accept (completion, ground_truth, **info): {e}"
        ) from None
    except ValueError:  # no signature available (some builtins): trust it
        return target
    return _accepts_info(target)


REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "iou": iou_reward,
    "vision_r1": hard_format_and_correct,
    "format_accuracy": weighted(format=(format_reward, 0.1), accuracy=(accuracy_reward, 0.9)),
}


def get_reward(name_or_path: str) -> RewardFn:
    """A registry name (:data:`REWARDS`) or a dotted path for :func:`load_reward`."""
    if name_or_path in REWARDS:
        return REWARDS[name_or_path]
    if ":" in name_or_path or "." in name_or_path:
        return load_reward(name_or_path)
    raise ValueError(
        f"unknown reward {name_or_path!r}; choose one of {list(REWARDS)} or a 'module:function' path"
    )
