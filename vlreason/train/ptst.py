"""Progressive Thinking Suppression Training (Vision-R1): the stage schedule as data.

A PTST run is RL in stages; each stage fixes the completion length limit and the
number of samples per question (G) for a number of optimizer steps. The paper runs
4K tokens x G=16, then 8K x G=8 (then optionally 16K x G=4), keeping samples x length
constant so that every stage costs about the same.

Everything here is a pure function of the stage list and a step, so a resumed run
finds its stage from the global step alone:

    stages = [Stage("stage1", 24, 8, 30), Stage("stage2", 48, 4, 30)]
    validate_stages(stages)
    index, stage, step_in_stage = stage_at(stages, 35)   # -> 1, stage2, 5
    total_steps(stages)                                   # -> 60
    check_constant_budget(stages, tolerance=0.0)          # raises if the budget drifts

:func:`phase_lr_lambda` gives a learning-rate multiplier for a run made of several
phases (e.g. cold-start SFT then RL), each with its own peak, warm-up and decay, also
as a pure function of the global step.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from vlreason.config import doc
from vlreason.train.schedule import lr_lambda

log = logging.getLogger(__name__)

__all__ = [
    "LRPhase",
    "Stage",
    "check_constant_budget",
    "phase_lr_lambda",
    "stage_at",
    "stage_ends",
    "token_budget",
    "total_steps",
    "validate_stages",
]


@dataclass
class Stage:
    """One PTST stage (all fields required in a config)."""

    name: str = doc("Stage label, logged as the `stage` metric (e.g. stage1).")
    max_new_tokens: int = doc("Completion length limit of this stage (tokens).")
    num_generations: int = doc("Samples per question (G) in this stage.")
    steps: int = doc("Optimizer steps in this stage.")

    def validate(self) -> None:
        if not str(self.name).strip():
            raise ValueError("a PTST stage needs a non-empty name")
        for key in ("max_new_tokens", "num_generations", "steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PTST stage '{self.name}': {key} must be a positive integer, got {value!r}")


def validate_stages(stages: Sequence[Stage]) -> None:
    """Non-empty, every stage valid, names unique (they label metrics and plots)."""
    if not stages:
        raise ValueError("the PTST schedule has no stages")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"PTST stage names must be unique, got {names}")
    for stage in stages:
        stage.validate()


def total_steps(stages: Sequence[Stage]) -> int:
    """Optimizer steps over all stages."""
    return sum(s.steps for s in stages)


def stage_ends(stages: Sequence[Stage], offset: int = 0) -> list[int]:
    """Number of steps done at the end of each stage, counted from ``offset``
    (e.g. ``offset`` = cold-start steps gives global step counts)."""
    ends, done = [], offset
    for stage in stages:
        done += stage.steps
        ends.append(done)
    return ends


def stage_at(stages: Sequence[Stage], step: int) -> tuple[int, Stage, int]:
    """``(index, stage, step_in_stage)`` of 0-based ``step`` counted from the first stage.

    Stage ``i`` covers steps ``[sum(steps[:i]), sum(steps[:i+1]))``. Raises ValueError
    for a negative step or one past the end of the schedule.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start = 0
    for index, stage in enumerate(stages):
        if step < start + stage.steps:
            return index, stage, step - start
        start += stage.steps
    raise ValueError(f"step {step} is past the end of the PTST schedule ({start} steps)")


def token_budget(stage: Stage) -> int:
    """Sampled tokens per question at most: ``max_new_tokens x num_generations``."""
    return stage.max_new_tokens * stage.num_generations


def check_constant_budget(stages: Sequence[Stage], tolerance: float = 0.0, *, strict: bool = True) -> bool:
    """Whether samples x length stays within ``tolerance`` (relative) of the first stage's.

    A stage off by more raises ValueError (``strict``) or emits a warning and returns
    False. ``tolerance`` 0.1 accepts budgets within 10% of the first stage's.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    reference = token_budget(stages[0])
    off = [s for s in stages if abs(token_budget(s) - reference) > tolerance * reference]
    if not off:
        return True
    listed = ", ".join(f"{s.name}: {s.max_new_tokens} x {s.num_generations} = {token_budget(s)}" for s in stages)
    message = (f"PTST samples x length is not constant (tolerance {tolerance:g}): {listed}. "
               "Vision-R1 keeps it constant so every stage costs about the same")
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=2)
    log.warning(message)
    return False


# ---- learning rate over several phases ------------------------------------------------


@dataclass(frozen=True)
class LRPhase:
    """A phase of a run with its own learning-rate curve.

    From global step ``start`` on, the multiplier of the optimizer's base lr is
    ``lr_scale * lr_lambda(step - start, warmup_steps, steps, kind, min_lr_ratio)``:
    warm-up and decay restart at the phase's first step.
    """

    start: int
    steps: int
    lr_scale: float = 1.0
    warmup_steps: int = 0
    kind: str = "constant"
    min_lr_ratio: float = 0.0


def phase_lr_lambda(step: int, phases: Sequence[LRPhase]) -> float:
    """Learning-rate multiplier at 0-based global ``step``: the last phase that has
    started (phases sorted by ``start``, the first starting at 0) sets it."""
    current = phases[0]
    for phase in phases:
        if phase.start <= step:
            current = phase
    return current.lr_scale * lr_lambda(
        step - current.start, warmup_steps=current.warmup_steps, total_steps=current.steps,
        kind=current.kind, min_lr_ratio=current.min_lr_ratio,
    )
