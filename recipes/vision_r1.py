"""Vision-R1 (arXiv 2503.06749): cold-start SFT, then GRPO under Progressive Thinking
Suppression Training (PTST), in one run.

    vlreason train vision_r1 [--config FILE] [key=value ...]
    python recipes/vision_r1.py [--config FILE] [key=value ...]

One loop, one global step: steps ``0 .. cold_start.steps-1`` are supervised
fine-tuning on ``<think>...</think><answer>...</answer>`` targets (SFTPhases: loss on
assistant tokens only, LoRA or full via ``model.lora.enabled``); the following steps
walk ``ptst.stages``, each with its own completion length limit and samples per
question (GRPOPhases with ``num_generations`` / ``max_new_tokens`` per stage). The
stage is a pure function of the global step (vlreason.train.ptst), so resuming inside
any stage is exact. Every step logs ``stage``, ``stage_index`` (0 = cold start),
``max_new_tokens`` (the cold start's target cutoff), ``num_generations`` (0 in the
cold start: nothing is sampled) and ``truncated_frac``. At the end of every stage (the
cold start included) the held-out split ``data.eval`` is evaluated with
vlreason.evaluation (greedy by default, ``eval.*``): the summary goes into that step's
metrics line as ``eval/*`` and is appended to ``RUN_DIR/eval_stages.jsonl``.

With no config it starts from the tiny random offline model (a true cold start) and
the bundled synthetic demo data, and runs in about 30 s on 2 CPU cores.

Choices made here (the paper leaves them open, or the tiny default needs them):

* **Reward and answer checking.** ``algorithm.reward=vision_r1``: 1 only when the
  format is exactly ``<think>..</think><answer>..</answer>``, the completion was not
  truncated at the stage's length limit, and the answer is right; else 0. The answer
  check (vlreason.rewards.accuracy) is exact choice matching for multiple choice
  (letter or option text), exact rational comparison for numbers, math-verify for
  maths, normalised string equality otherwise. GRPO as in METHODS.md: clip 0.2, k3 KL
  with beta 1e-2, advantages normalised by the group std, no system prompt.
* **KL reference = the cold-start model.** The reference is a frozen copy of the
  policy taken at the first RL step (also with LoRA: a full copy, the adapter
  included), not the checkpoint the run started from (a random model in the demo).
  The cold-start model is saved to ``RUN_DIR/cold_start/`` (loadable with
  ``from_pretrained``, plus ``trainable.safetensors``, which a resume past the cold
  start reloads as the reference). With ``cold_start.steps=0`` the reference is the
  starting model, loaded as in the grpo recipe.
* **Learning rate across phases.** One AdamW, one LambdaLR over the whole run, a pure
  function of the global step (vlreason.train.ptst.phase_lr_lambda): the cold start
  runs at ``cold_start.lr`` with its own warm-up and schedule, the RL stages at
  ``optim.lr`` with ``optim.warmup_steps`` / ``optim.schedule`` restarted at the first
  RL step (the paper uses different rates for the two). The scheduler's step count
  and the optimizer are in every checkpoint, so resume restores the rate exactly.
  Adam's moments are reset at the first RL step: the paper runs the two phases as
  separate trainings, and SFT-sized second moments would otherwise shrink the first
  RL updates for hundreds of steps (beta2 0.999). The reset is tied to the global
  step, so a resumed run does exactly the same.
* **Tiny-default stage sizes.** The demo solutions are 19-52 tokens (median 23) plus
  the end token. Stage 1 (24 tokens x G=8) truncates about half of them, stage 2
  (48 x G=4) almost none: samples x length = 192 in both, as the paper's 4K x 16 and
  8K x 8. 80 cold-start steps at lr 2e-3 (batch 16) take the random model to the
  format; then 24 + 24 RL steps at lr 3e-4 (8 prompts a step). The paper's schedule is
  ``recipes/configs/vision_r1_paper.yaml``.
* ``rollout.num_generations`` / ``rollout.max_new_tokens`` are not used by the RL
  stages (each stage sets its own). With ``algorithm.aggregation=seq-mean-token-sum-norm``
  the Dr.GRPO constant is the current stage's ``max_new_tokens``.
* **No system prompt, literally.** ``rollout.prompt.system_prompt=""`` with
  ``rollout.prompt.template_default_system=false`` (the default here): the Qwen2-VL and
  Qwen2.5-VL chat templates insert "You are a helpful assistant." when a conversation
  has no system turn; the prompt builder removes that turn, so the rendered prompt
  starts with the user turn.
* Stage-end evaluation uses one length limit (``eval.max_new_tokens``) for every stage,
  so the numbers compare across stages. Every process evaluates the whole eval split
  (identical results), so the logged metrics agree across processes; only the main one
  writes files. A stage end whose update was skipped (non-finite loss) is not evaluated.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlreason.config import doc
from vlreason.data.schema import load_canonical
from vlreason.data.stream import RowStream
from vlreason.evaluation import EvalConfig
from vlreason.models.loading import trainable_parameters
from vlreason.models.tiny import tiny_model_path
from vlreason.recipe_base import Recipe, RunConfig, load_policy, load_split, run_recipe_cli
from vlreason.registry import register_recipe
from vlreason.rollout.batch import RolloutBatch
from vlreason.rollout.policy import RolloutConfig
from vlreason.rollout.prompts import PromptConfig
from vlreason.train.grpo import GRPOConfig, GRPOPhases
from vlreason.train.heldout import HeldOutEval
from vlreason.train.loop import OptimConfig, Trainer
from vlreason.train.metrics import StepTimer
from vlreason.train.ptst import (
    LRPhase,
    Stage,
    check_constant_budget,
    phase_lr_lambda,
    stage_at,
    stage_ends,
    total_steps,
    validate_stages,
)
from vlreason.train.schedule import SCHEDULES
from vlreason.train.sft import SFTConfig, SFTPhases
from vlreason.train.weights import load_tensors_into_

COLD_START = "cold_start"  # the `stage` metric of the supervised steps
SNAPSHOT_WEIGHTS = "trainable.safetensors"
EVAL_FILE = "eval_stages.jsonl"


@dataclass
class ColdStartConfig(SFTConfig):
    """Stage 0: the SFT settings (target, cutoff, micro-batch) plus the phase's batch, length and lr."""

    prompts_per_step: int = doc("Rows per optimizer step of the cold start, over all processes "
                                "(0: the run's prompts_per_step).", 0)
    steps: int = doc("Cold-start SFT steps before RL (0: RL straight from model.name_or_path).", 80)
    lr: float = doc("Peak learning rate of the cold start (the RL stages use optim.lr).", 2e-3)
    warmup_steps: int = doc("Linear warm-up steps of the cold start.", 10)
    schedule: str = doc("cosine | constant (after warm-up), over the cold-start steps.", "constant")
    data: str = doc("Cold-start dataset (rows with a `solution`); empty: data.train.", "")

    def validate(self) -> None:
        super().validate()
        if self.steps < 0 or self.warmup_steps < 0 or self.prompts_per_step < 0:
            raise ValueError("cold_start.steps, warmup_steps and prompts_per_step must be >= 0")
        if self.lr <= 0:
            raise ValueError("cold_start.lr must be positive")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"cold_start.schedule must be one of {SCHEDULES}, got '{self.schedule}'")


def tiny_stages() -> list[Stage]:
    """The CPU demo's PTST stages: samples x length = 192 in both."""
    return [Stage("stage1", max_new_tokens=24, num_generations=8, steps=24),
            Stage("stage2", max_new_tokens=48, num_generations=4, steps=24)]


@dataclass
class PTSTConfig:
    """The RL stages, and how strictly samples x length must stay constant."""

    stages: list[Stage] = field(default_factory=tiny_stages, metadata={
        "help": "RL stages in order, each {name, max_new_tokens, num_generations, steps}."})
    budget_tolerance: float = doc(
        "Allowed relative deviation of a stage's max_new_tokens x num_generations from stage 1's.", 0.0)
    strict_budget: bool = doc("A budget outside the tolerance is an error (true) or a warning (false).", True)

    def validate(self) -> None:
        validate_stages(self.stages)
        check_constant_budget(self.stages, self.budget_tolerance, strict=self.strict_budget)


@dataclass
class VisionR1RecipeConfig(RunConfig):
    """The whole run; ``max_steps`` resolves to the schedule's length when 0."""

    output_dir: str = "runs/vision_r1"
    max_steps: int = doc(
        "Optimizer steps; 0: the whole schedule (cold_start.steps + the PTST stages' steps). "
        "A smaller value stops early.", 0)
    save_steps: int = 0
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(num_generations=8, max_new_tokens=48,
                                              prompt=PromptConfig(template_default_system=False)),
        metadata={"help": "Sampling, images and prompt format (length and G come from ptst.stages)."},
    )
    cold_start: ColdStartConfig = field(
        default_factory=lambda: ColdStartConfig(prompts_per_step=16, micro_batch_prompts=16),
        metadata={"help": "Stage 0: supervised fine-tuning on <think>/<answer> solutions."},
    )
    ptst: PTSTConfig = field(default_factory=PTSTConfig, metadata={"help": "Progressive thinking suppression stages."})
    prompts_per_step: int = doc("Prompt groups per optimizer step of the RL stages, over all processes "
                                "(the cold start's: cold_start.prompts_per_step).", 8)
    algorithm: GRPOConfig = field(
        default_factory=lambda: GRPOConfig(micro_batch_prompts=4, kl_coef=0.01,
                                           kl_estimator="k3", advantage="grpo", reward="vision_r1"),
        metadata={"help": "GRPO settings of the RL stages."},
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4),
                               metadata={"help": "Optimizer; lr, warmup_steps and schedule of the RL stages."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Held-out evaluation at every stage end."})
    stage_eval: bool = doc("Evaluate data.eval at the end of every stage (cold start included).", True)

    def validate(self) -> None:
        super().validate()
        schedule = self.cold_start.steps + total_steps(self.ptst.stages)
        if self.max_steps == 0:
            self.max_steps = schedule
        if not 0 < self.max_steps <= schedule:
            raise ValueError(f"max_steps={self.max_steps} but the schedule has {schedule} steps "
                             f"(cold_start.steps + ptst.stages); use 0 for the whole schedule")


PhaseStep = Callable[[RolloutBatch], tuple[torch.Tensor, dict[str, Any]]]


@register_recipe("vision_r1")
class VisionR1Recipe(Recipe):
    config_class = VisionR1RecipeConfig

    @staticmethod
    def default_model() -> Path:
        """The cached tiny random checkpoint: the cold start starts from scratch."""
        return tiny_model_path()

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.cold_steps = cfg.cold_start.steps
        self.stages = cfg.ptst.stages
        # With a cold start the reference is the cold-start model, copied at the first RL step.
        with_reference = cfg.algorithm.kl_coef > 0 and self.cold_steps == 0
        self.policy = load_policy(cfg, with_reference=with_reference)
        self.model = self.policy.model
        train = load_split(cfg.data.train, "train")
        cold = load_canonical(cfg.cold_start.data) if cfg.cold_start.data else train
        self.cold_stream = RowStream(cold, seed=cfg.seed, name="cold-start")
        self.stream = RowStream(train, seed=cfg.seed)
        self.sft = SFTPhases(cfg.cold_start, self.policy, self.cold_stream,
                             prompts_per_step=cfg.cold_start.prompts_per_step or cfg.prompts_per_step)
        self.grpo = GRPOPhases(cfg.algorithm, self.policy, self.stream, cfg.seed,
                               prompts_per_step=cfg.prompts_per_step)
        self.eval_points = self.stage_end_points()
        self.run_dir = Path(cfg.output_dir)
        self.rl_started = False
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained,
                               lr_lambda=self.lr_lambda())
        self.heldout = (HeldOutEval(self.policy, load_split(cfg.data.eval, "eval"), cfg.eval, self.run_dir,
                                    file=EVAL_FILE, is_main=self.trainer.is_main) if cfg.stage_eval else None)

    def lr_lambda(self) -> Callable[[int], float]:
        """Cold start at cold_start.lr, then the RL stages at optim.lr, each phase with its
        own warm-up and schedule; the base lr of the optimizer is optim.lr."""
        c, o = self.cfg.cold_start, self.cfg.optim
        phases = (
            LRPhase(start=0, steps=self.cold_steps, lr_scale=c.lr / o.lr,
                    warmup_steps=c.warmup_steps, kind=c.schedule),
            LRPhase(start=self.cold_steps, steps=total_steps(self.stages), warmup_steps=o.warmup_steps,
                    kind=o.schedule, min_lr_ratio=o.min_lr_ratio),
        )
        return functools.partial(phase_lr_lambda, phases=phases)

    def stage_of(self, step: int) -> tuple[int, str]:
        """(stage_index, stage name) of 0-based global ``step``; index 0 is the cold start."""
        if step < self.cold_steps:
            return 0, COLD_START
        index, stage, _ = stage_at(self.stages, step - self.cold_steps)
        return index + 1, stage.name

    def stage_end_points(self) -> dict[int, tuple[int, str]]:
        """Steps done (1-based) after which to evaluate -> (stage_index, name): every stage
        end, and the last step of a run that max_steps cut short."""
        ends = ([self.cold_steps] if self.cold_steps else []) + stage_ends(self.stages, self.cold_steps)
        points = {end: self.stage_of(end - 1) for end in ends if end <= self.cfg.max_steps}
        points.setdefault(self.cfg.max_steps, self.stage_of(self.cfg.max_steps - 1))
        return points

    # ---- the loop's recipe interface -----------------------------------------------------
    def prepare(self, step: int, timer: StepTimer) -> tuple[list[RolloutBatch], dict[str, Any]]:
        phase = self.prepare_cold_start if step < self.cold_steps else self.prepare_rl
        micro, metrics, self.phase_loss = phase(step, timer)
        self.timer = timer
        return micro, metrics

    def prepare_cold_start(self, step: int, timer: StepTimer) -> tuple[list[RolloutBatch], dict[str, Any], PhaseStep]:
        micro, metrics = self.sft.prepare(step, timer)
        rows = sum(b.num_completions for b in micro)
        metrics.update(stage=COLD_START, stage_index=0, max_new_tokens=self.cfg.cold_start.max_target_tokens,
                       num_generations=0, truncated_frac=metrics["target_truncated"] / max(rows, 1))
        return micro, metrics, self.sft.loss

    def prepare_rl(self, step: int, timer: StepTimer) -> tuple[list[RolloutBatch], dict[str, Any], PhaseStep]:
        if not self.rl_started:
            self.start_rl(step)
        index, stage, _ = stage_at(self.stages, step - self.cold_steps)
        micro, metrics = self.grpo.prepare(step, timer, num_generations=stage.num_generations,
                                           max_new_tokens=stage.max_new_tokens)
        metrics.update(stage=stage.name, stage_index=index + 1, max_new_tokens=stage.max_new_tokens,
                       num_generations=stage.num_generations)
        return micro, metrics, self.grpo.loss

    def start_rl(self, step: int) -> None:
        """The first RL step of this process. At the boundary (step == cold_start.steps):
        reset Adam's moments and save the cold-start model; on a resume past it, reload
        that model's weights. Either way the KL reference becomes a frozen copy of it."""
        self.rl_started = True
        if self.cold_steps == 0:
            return  # the reference (if any) is the starting model, loaded in setup
        snapshot = self.run_dir / COLD_START
        if step == self.cold_steps:
            self.trainer.optimizer.state.clear()
            if self.trainer.is_main:
                self.policy.save_pretrained(snapshot)
                save_file({n: p.detach().cpu().clone().contiguous() for n, p in trainable_parameters(self.model).items()},
                          str(snapshot / SNAPSHOT_WEIGHTS))
        if self.cfg.algorithm.kl_coef <= 0:
            return
        reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        if step > self.cold_steps:
            path = snapshot / SNAPSHOT_WEIGHTS
            if not path.is_file():
                raise FileNotFoundError(f"resuming after the cold start needs its weights as the KL reference: "
                                        f"{path} is missing")
            load_tensors_into_(reference.named_parameters(), path,
                               required=trainable_parameters(self.model).keys())
        self.policy.reference, self.policy.has_reference = reference, True

    def step(self, micro_batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.phase_loss(micro_batch)

    def after_update(self, step: int) -> dict[str, Any] | None:
        """At a stage end, evaluate data.eval; the ``eval/*`` metrics join this step's line
        of metrics.jsonl."""
        done = step + 1
        if self.heldout is None or done not in self.eval_points:
            return None
        index, name = self.eval_points[done]
        with self.timer("eval"):
            return self.trainer.rollout_pass(
                lambda: self.heldout(done, f"after {name}", stage=name, stage_index=index))

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "cold_start_data": self.cold_stream.state_dict(),
                "skipped_rows": self.grpo.skipped_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "data" in state:
            self.stream.load_state_dict(state["data"])
        if "cold_start_data" in state:
            self.cold_stream.load_state_dict(state["cold_start_data"])
        self.grpo.skipped_rows = state.get("skipped_rows", 0)


if __name__ == "__main__":
    sys.exit(run_recipe_cli(VisionR1Recipe, sys.argv[1:], name="vision_r1"))
