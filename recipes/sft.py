"""Supervised fine-tuning (warm-up / cold start) on the shared loop.

    vlreason train sft [--config FILE] [key=value ...]

Cross-entropy on the assistant turn only (the row's ``solution``, or its bare answer
with ``sft.target=answer``); image and prompt tokens get no loss. Same checkpoints,
metrics, resume and ``final/`` as every recipe; ``eval_rows`` > 0 adds a greedy
held-out accuracy at the end (``eval.json`` in the run directory).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlreason.config import doc
from vlreason.data.stream import RowStream
from vlreason.evaluation import EvalConfig, evaluate
from vlreason.models.tiny import tiny_model_path
from vlreason.recipe_base import Recipe, RunConfig, load_policy, load_split, run_recipe_cli
from vlreason.registry import register_recipe
from vlreason.train.loop import Trainer
from vlreason.train.metrics import StepTimer
from vlreason.train.sft import SFTConfig, SFTPhases


@dataclass
class SFTRecipeConfig(RunConfig):
    # shared keys (help in RunConfig), restated with this recipe's defaults
    output_dir: str = "runs/sft"
    max_steps: int = 100
    # SFT's own
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "Supervised settings."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Held-out evaluation at the end."})
    eval_rows: int = doc("Evaluate this many held-out rows at the end (0: skip).", 0)


@register_recipe("sft")
class SFTRecipe(Recipe):
    config_class = SFTRecipeConfig

    @staticmethod
    def default_model() -> Path:
        """The cached tiny random checkpoint (a cold start)."""
        return tiny_model_path()

    def setup(self) -> None:
        cfg = self.cfg
        self.policy = load_policy(cfg)
        self.model = self.policy.model
        self.stream = RowStream(load_split(cfg.data.train, "train"), seed=cfg.seed)
        self.phases = SFTPhases(cfg.sft, self.policy, self.stream, prompts_per_step=cfg.prompts_per_step)
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained)

    def train(self) -> Path:
        result = self.trainer.fit()
        if self.cfg.eval_rows > 0 and self.trainer.step >= self.cfg.max_steps:
            # every process takes part (FSDP2 gathers the sharded weights); the main one writes
            data = load_split(self.cfg.data.eval, "eval")
            eval_cfg = EvalConfig(**{**self.cfg.eval.__dict__, "limit": self.cfg.eval_rows})
            summary, _ = self.trainer.rollout_pass(lambda: evaluate(self.policy, data, eval_cfg))
            if self.trainer.is_main:
                (Path(self.cfg.output_dir) / "eval.json").write_text(json.dumps(summary, indent=2))
                print("eval:", json.dumps(summary))
        return result

    def prepare(self, step: int, timer: StepTimer) -> tuple[list[Any], dict[str, Any]]:
        return self.phases.prepare(step, timer)

    def step(self, micro_batch) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.phases.loss(micro_batch)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "skipped_rows": self.phases.rows.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "data" in state:
            self.stream.load_state_dict(state["data"])
        self.phases.rows.skipped = state.get("skipped_rows", 0)


if __name__ == "__main__":
    sys.exit(run_recipe_cli(SFTRecipe, sys.argv[1:], name="sft"))
