"""The training loop with a toy recipe: NaN steps are skipped and counted, too many stop
the run after a checkpoint, an error mid-run leaves a checkpoint, micro-batch losses add up."""

from __future__ import annotations

import json

import pytest
import torch

from vlreason.recipe_base import Recipe
from vlreason.train.checkpoint import latest_checkpoint
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer, TrainingStopped


class ToyRecipe(Recipe):
    """Fits y = 2x with one weight; ``nan_steps`` return a NaN loss, ``fail_at`` raises."""

    def __init__(self, nan_steps=(), fail_at=None):
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.model.weight)
        self.nan_steps, self.fail_at = set(nan_steps), fail_at
        self.position = 0
        self.current = 0

    def prepare(self, step, timer):
        if step == self.fail_at:
            raise RuntimeError("data source went away")
        self.current = step
        self.position += 2
        x = torch.tensor([[1.0], [2.0]])
        return [(x[:1], 2 * x[:1]), (x[1:], 2 * x[1:])], {"data/position": self.position}

    def step(self, micro):
        x, y = micro
        loss = ((self.model(x) - y) ** 2).sum() / 2  # the two micro-batches add up to the mean
        if self.current in self.nan_steps:
            loss = loss * float("nan")
        return loss, {}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _cfg(tmp_path, **kw):
    return LoopConfig(output_dir=str(tmp_path), max_steps=kw.pop("max_steps", 6), trackers=["jsonl"],
                      progress=False, optim=OptimConfig(lr=0.05, max_grad_norm=0.0), **kw)


def test_toy_recipe_learns_and_logs(tmp_path):
    recipe = ToyRecipe()
    Trainer(_cfg(tmp_path, max_steps=120), recipe).fit()
    assert abs(recipe.model.weight.item() - 2.0) < 0.05
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 121))
    # loss of step 1 (w = 0): mean of (0 - 2)^2 and (0 - 4)^2 = 10
    assert lines[0]["loss"] == pytest.approx(10.0)


def test_nan_steps_are_skipped_and_counted(tmp_path):
    recipe = ToyRecipe(nan_steps={1, 3})
    trainer = Trainer(_cfg(tmp_path, max_steps=6, max_nan_steps=5), recipe)
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in lines] == [0, 1, 1, 2, 2, 2]
    assert lines[1]["loss"] is None  # NaN is written as null
    assert torch.isfinite(recipe.model.weight).all()


def test_too_many_nan_steps_stop_with_a_checkpoint(tmp_path):
    recipe = ToyRecipe(nan_steps={2, 3, 4, 5})
    with pytest.raises(TrainingStopped, match="max_nan_steps=2"):
        Trainer(_cfg(tmp_path, max_steps=10, max_nan_steps=2), recipe).fit()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-4"


def test_error_mid_run_leaves_a_checkpoint_then_resume_continues(tmp_path):
    with pytest.raises(RuntimeError, match="data source went away"):
        Trainer(_cfg(tmp_path, max_steps=6), ToyRecipe(fail_at=3)).fit()
    assert latest_checkpoint(tmp_path).name == "step-3"
    recipe = ToyRecipe()
    trainer = Trainer(_cfg(tmp_path, max_steps=6, resume="auto"), recipe)
    trainer.fit()
    assert trainer.step == 6 and recipe.position == 12  # 3 restored steps + 3 new, 2 rows each
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_no_trainable_parameters_is_a_clear_error(tmp_path):
    recipe = ToyRecipe()
    recipe.model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(_cfg(tmp_path), recipe)
