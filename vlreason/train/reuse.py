"""Several optimizer updates per rollout (PPO-style), for every recipe that samples its
own batches (GRPO and the recipes on it, Vision-OPD).

One rollout of M x ``prompts_per_step`` prompts is cut into M prompt-aligned
mini-batches and serves K consecutive loop steps (= optimizer updates): update u trains
on mini-batch u mod M (K / M epochs). ``logp_old`` is fixed at the rollout's weights:
mini-batch 0's comes from the first update's own forward (it runs at the rollout
weights, so no extra pass; the recipe records it when ``Turn.capture_old``), the
others' from one no-gradient pass before the first update (:func:`capture_old_logprobs`).
The first update's ratio is exactly 1; later ones use ``logp_old``. The rollout is not
stored in checkpoints: a resume inside a rollout's K updates samples a new rollout
(logged); ``save_steps`` a multiple of K keeps resume exact.

    reuse = RolloutReuse(cfg.updates_per_rollout, cfg.mini_batches)
    turn = reuse.next(step, lambda: Rollout(minis, normalisers, metrics))
    micro_batches, normaliser = turn.batch, turn.normaliser
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from vlreason.config import doc
from vlreason.rollout.batch import RolloutBatch
from vlreason.train.metrics import StepTimer

log = logging.getLogger(__name__)


@dataclass
class ReuseConfig:
    """The two keys, in a recipe's ``algorithm`` section (its config extends this)."""

    updates_per_rollout: int = doc(
        "Optimizer updates (loop steps) per rollout batch, PPO-style: logp_old fixed at the rollout, "
        "the importance ratio (and clipping, where the loss clips) acts from the second update on. "
        "1: on-policy.", 1)
    mini_batches: int = doc(
        "Mini-batches the rollout is cut into (each of prompts_per_step prompts; update u uses "
        "mini-batch u mod mini_batches); must divide updates_per_rollout.", 1)

    def validate_reuse(self) -> None:
        if self.updates_per_rollout < 1 or self.mini_batches < 1:
            raise ValueError("algorithm.updates_per_rollout and mini_batches must be >= 1")
        if self.updates_per_rollout % self.mini_batches:
            raise ValueError(f"algorithm.mini_batches={self.mini_batches} must divide "
                             f"updates_per_rollout={self.updates_per_rollout}")


@dataclass
class Rollout:
    """A rollout kept for the updates that reuse it."""

    minis: list[list[RolloutBatch]]  # mini-batch -> its micro-batches
    normalisers: list[float]  # the global token / sequence count of each mini-batch
    metrics: dict[str, Any]  # logged with every update that uses it
    key: Hashable = None  # what it was sampled for (GRPO: G and the length limit); another key samples anew
    max_tokens: int = 0  # the length limit it was sampled with (the Dr.GRPO constant)
    updates_done: int = 0


@dataclass(frozen=True)
class Turn:
    """One update's share of a rollout: mini-batch ``mini`` for update ``update``."""

    rollout: Rollout
    update: int
    mini: int
    reusing: bool  # K > 1: the rollout serves several updates

    @property
    def batch(self) -> list[RolloutBatch]:
        return self.rollout.minis[self.mini]

    @property
    def normaliser(self) -> float:
        return self.rollout.normalisers[self.mini]

    @property
    def capture_old(self) -> bool:
        """The first update of a reused rollout runs at the rollout weights: its forward
        is mini-batch 0's ``logp_old``, which the recipe's loss records."""
        return self.reusing and self.update == 0

    def metrics(self) -> dict[str, float]:
        """``rollout/update``, ``rollout/mini_batch`` and ``rollout/reused`` (K > 1 only)."""
        if not self.reusing:
            return {}
        return {"rollout/update": self.update, "rollout/mini_batch": self.mini, "rollout/reused": float(self.update > 0)}


class RolloutReuse:
    """Which rollout and mini-batch each loop step trains on."""

    def __init__(self, updates_per_rollout: int, mini_batches: int):
        self.updates_per_rollout = updates_per_rollout
        self.mini_batches = mini_batches
        self.current: Rollout | None = None

    def next(self, step: int, sample: Callable[[], Rollout], key: Hashable = None) -> Turn:
        """The turn of loop step ``step``: the next mini-batch of the current rollout, or
        of a new one from ``sample()`` once the current has served K updates (or was
        sampled for another ``key``)."""
        K = self.updates_per_rollout
        current = self.current
        if current is None or current.updates_done >= K or current.key != key:
            if K > 1 and step % K and current is None:
                log.warning("step %d: no rollout to reuse (resumed inside a rollout's %d updates); "
                            "sampling a new one", step + 1, K)
            current = self.current = sample()
            current.key = key
        u = current.updates_done
        current.updates_done += 1
        return Turn(current, u, u % self.mini_batches, reusing=K > 1)


def capture_old_logprobs(minis: list[list[RolloutBatch]], logprobs: Callable[[RolloutBatch], torch.Tensor],
                         reuse: ReuseConfig, timer: StepTimer) -> None:
    """``logp_old`` of mini-batches 1.. at the rollout weights, before the first update
    (mini-batch 0's comes with the first update's forward), timed as ``old_logprobs``;
    nothing when every mini-batch is first trained at the rollout weights (M = 1)."""
    if reuse.updates_per_rollout == 1 or reuse.mini_batches == 1:
        return
    with timer("old_logprobs"), torch.no_grad():
        for micro in (mb for mini in minis[1:] for mb in mini):
            micro.old_logprobs_NT = logprobs(micro).detach()
