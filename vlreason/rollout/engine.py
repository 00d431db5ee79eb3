"""The rollout engine seam: what samples completions, and how it follows training.

A rollout engine samples G completions per prompt (:meth:`RolloutEngine.sample`), takes
the new weights after every optimizer update (:meth:`RolloutEngine.sync_weights`), and
can give its memory back while the update runs (:meth:`RolloutEngine.sleep`; the next
``sample`` wakes it). The loss's log-probabilities are always recomputed by the
trainer's own forward (``Policy.token_outputs``), never taken from the engine, so the
algorithms do not depend on which engine sampled.

:class:`TransformersEngine` is the only backend: the policy model itself samples
(``rollout/generate.py``), so there is nothing to sync and nothing to free beyond the
KV cache the decode loop drops after each rollout. A serving backend (vLLM, SGLang) is
one more class with these four methods; docs/rollout_engines.md is its design. The loop
(``vlreason/train/loop.py``) calls ``sleep`` after each rollout and ``sync_weights``
after each optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from vlreason.models.families import Family
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.generate import SamplingConfig, generate_completions

__all__ = ["RolloutEngine", "TransformersEngine"]


@runtime_checkable
class RolloutEngine(Protocol):
    def sample(self, prompts: PromptBatch, sampling: SamplingConfig, *, seed: int | list[int],
               num_generations: int | None = None, max_new_tokens: int | None = None) -> RolloutBatch:
        """G completions per prompt, prompt-major; one seed per prompt (or one int from which
        each prompt's seed follows by its position), so a prompt's samples depend on nothing
        else in the batch. Works after :meth:`sleep` (wakes as needed)."""
        ...

    def sync_weights(self) -> None:
        """Take the trained model's current weights (called after every optimizer step)."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds for sampling while the update runs."""
        ...


@dataclass
class TransformersEngine:
    """Sampling with the policy model itself (prefix-shared decode loop)."""

    model: torch.nn.Module
    family: Family
    processor: Any

    def sample(self, prompts: PromptBatch, sampling: SamplingConfig, *, seed: int | list[int],
               num_generations: int | None = None, max_new_tokens: int | None = None) -> RolloutBatch:
        return generate_completions(self.model, self.family, self.processor, prompts, sampling, seed=seed,
                                    num_generations=num_generations, max_new_tokens=max_new_tokens)

    def sync_weights(self) -> None:
        """Nothing to do: rollout reads the parameters training updates."""

    def sleep(self) -> None:
        """Nothing held: the decode loop's KV cache is dropped when each rollout ends."""
