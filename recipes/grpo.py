"""Plain GRPO on a vision-language model: the common base recipe.

    vlreason train grpo [--config FILE] [key=value ...]
    python recipes/grpo.py [--config FILE] [key=value ...]

With no config it trains the cached tiny offline model on the bundled synthetic demo
data for a few CPU minutes. Shape (torchtune-style): ``setup()`` builds components,
``train()`` runs the shared loop with this recipe's ``prepare``/``step``,
``cleanup()`` releases them. The maths lives in vlreason.algorithms; the GRPO phases
(rollout, reward, advantages, reference) in vlreason.train.grpo.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from vlreason.config import doc
from vlreason.data.stream import RowStream
from vlreason.evaluation import EvalConfig
from vlreason.recipe_base import Recipe, RunConfig, load_split, run_recipe_cli
from vlreason.registry import register_recipe
from vlreason.rollout.policy import RolloutConfig
from vlreason.train.grpo import GRPOConfig, GRPOPhases
from vlreason.train.heldout import HeldOutEval
from vlreason.train.loop import OptimConfig, Trainer
from vlreason.train.metrics import StepTimer


@dataclass
class GRPORecipeConfig(RunConfig):
    # shared keys (help in RunConfig), restated with this recipe's defaults
    output_dir: str = "runs/grpo"
    max_steps: int = 60
    save_steps: int = 20
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_generations=8, max_new_tokens=48))
    prompts_per_step: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    # GRPO's own
    algorithm: GRPOConfig = field(default_factory=lambda: GRPOConfig(micro_batch_prompts=4),
                                  metadata={"help": "GRPO settings."})
    heldout_eval: bool = doc("Evaluate data.eval before the first step and after the last "
                             "(eval/* metrics, RUN_DIR/eval.jsonl, printed).", True)
    eval: EvalConfig = field(
        default_factory=lambda: EvalConfig(num_samples=4, temperature=1.0, max_new_tokens=48),
        metadata={"help": "Held-out evaluation (default: 4 samples per row at the sampling temperature)."},
    )


@register_recipe("grpo")
class GRPORecipe(Recipe):
    config_class = GRPORecipeConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.start_policy(with_reference=cfg.algorithm.kl_coef > 0)
        train = load_split(cfg.data.train, "train")
        self.stream = RowStream(train, seed=cfg.seed)
        self.phases = GRPOPhases(cfg.algorithm, self.policy, self.stream, cfg.seed,
                                 prompts_per_step=cfg.prompts_per_step)
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained)
        self.heldout = (HeldOutEval(self.policy, load_split(cfg.data.eval, "eval"), cfg.eval, cfg.output_dir,
                                    is_main=self.trainer.is_main) if cfg.heldout_eval else None)

    # ---- the loop's recipe interface ---------------------------------------------------
    def before_training(self) -> dict[str, Any] | None:
        return self.heldout(0, "before training") if self.heldout else None

    def after_update(self, step: int) -> dict[str, Any] | None:
        if self.heldout is None or step + 1 != self.cfg.max_steps:
            return None
        with self.timer("eval"):
            return self.trainer.rollout_pass(lambda: self.heldout(step + 1, "after training"))

    def prepare(self, step: int, timer: StepTimer) -> tuple[list[Any], dict[str, Any]]:
        self.timer = timer
        return self.phases.prepare(step, timer)

    def step(self, micro_batch) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.phases.loss(micro_batch)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "skipped_rows": self.phases.skipped_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "data" in state:
            self.stream.load_state_dict(state["data"])
        self.phases.skipped_rows = state.get("skipped_rows", 0)


if __name__ == "__main__":
    sys.exit(run_recipe_cli(GRPORecipe, sys.argv[1:], name="grpo"))
