"""The rollout engine seam: the policy samples through its engine, and the loop tells the
engine to free its memory after each rollout and to take the new weights after each
optimizer step (skipped steps change no weight, so nothing is pushed)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vlreason.recipe_base import Recipe
from vlreason.rollout.engine import RolloutEngine, TransformersEngine
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer


class RecordingEngine:
    def __init__(self, events: list[str]):
        self.events = events

    def sample(self, prompts, sampling, *, seed, num_generations=None, max_new_tokens=None):
        self.events.append("sample")

    def sync_weights(self):
        self.events.append("sync")

    def sleep(self):
        self.events.append("sleep")


class EngineRecipe(Recipe):
    """One weight; step 1's loss is NaN (the update is skipped)."""

    def __init__(self, events: list[str]):
        self.model = torch.nn.Linear(1, 1, bias=False)
        self.events = events
        self.policy = SimpleNamespace(engine=RecordingEngine(events), compute_dtype=torch.float32,
                                      family=None, reference=None)
        self.current = 0

    def prepare(self, step, timer):
        self.current = step
        self.policy.engine.sample(None, None, seed=step)
        return [torch.ones(1, 1)], {}

    def step(self, x):
        self.events.append("update")
        loss = (self.model(x) - 2).pow(2).sum()
        return (loss * float("nan") if self.current == 1 else loss), {}


def test_the_loop_frees_the_engine_after_rollout_and_pushes_weights_after_each_update(tmp_path):
    events: list[str] = []
    cfg = LoopConfig(output_dir=str(tmp_path), max_steps=3, trackers=[], progress=False,
                     optim=OptimConfig(lr=0.1, max_grad_norm=0.0))
    Trainer(cfg, EngineRecipe(events)).fit()
    assert events == ["sample", "sleep", "update", "sync",
                      "sample", "sleep", "update",  # NaN step: no optimizer step, no push
                      "sample", "sleep", "update", "sync"]


def test_the_transformers_engine_samples_with_the_policy_model():
    from vlreason.models.families import get_family
    from vlreason.rollout.policy import Policy, RolloutConfig
    from vlreason.views.budget import PixelBudget

    model = torch.nn.Linear(1, 1)
    family = get_family("qwen2_5_vl")
    policy = Policy(model=model, family=family, processor=object(), budget=PixelBudget(3136, 12544),
                    rollout=RolloutConfig())
    assert isinstance(policy.engine, TransformersEngine) and isinstance(policy.engine, RolloutEngine)
    assert policy.engine.model is model and policy.engine.family is family
    events: list[str] = []
    other = Policy(model=model, family=family, processor=object(), budget=PixelBudget(3136, 12544),
                   rollout=RolloutConfig(), engine=RecordingEngine(events))
    other.sample(None, seed=0)
    assert events == ["sample"]
