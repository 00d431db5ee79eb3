"""SOPHIA (arXiv 2507.16814): semi-off-policy RL, one round.

    vlreason train sophia [--config FILE] [key=value ...]
    python recipes/sophia.py [--config FILE] [key=value ...]

The behaviour policy is the trainable VLM's own perception plus an external text-only
reasoner (vlreason.reasoners: a local transformers causal LM, any OpenAI-compatible
chat-completions server, or a ``module:factory`` of your own). One step:

1. captions (``time/captions``): draw ``prompts_per_step`` rows; the VLM writes
   ``sophia.num_captions`` (K) descriptions of each row's image(s) with
   ``sophia.caption_prompt``, a prompt that does NOT show the question or its choices;
2. reasoning (``time/reasoner``): for each caption the reasoner writes
   ``sophia.num_solutions`` (N) solutions from ``sophia.solution_template`` (caption +
   question + choices; ``<image>`` markers removed), each normalised to the target
   ``<think>...</think><answer>...</answer>`` format (``vlreason.reasoners.normalise_solution``:
   QwQ-32B / R1 templates open ``<think>`` in the prompt, so the text only closes it);
3. rewards: R(y) in {0, 1} (``sophia.reward``: ``accuracy``, the ``<answer>`` block must
   match the row's answer; or ``hard``, strict ``<think></think><answer></answer>`` format
   AND correct); the caption reward R(c) = mean of R(y) over its N solutions;
4. selection (:func:`select_solutions`): a solution is kept only if R(c) >
   ``sophia.threshold`` (0.75), it is correct, it has the strict format (an answer-only
   solution is scored but never kept: ``sophia/kept_malformed``), it fits
   ``sophia.max_target_tokens`` whole (longer ones are rejected, never cut:
   ``sophia/kept_too_long``), and it is the shortest such solution (policy tokenizer
   tokens; ties: first caption, then first solution) of its row: at most one kept
   solution per row;
5. update (``time/update``): off-policy policy gradient on the ORIGINAL (image, question)
   prompt -> kept solution with importance ratio 1, no clipping, no KL, advantage 1
   (``vlreason.algorithms.policy_gradient_loss``), i.e. the supervised NLL of the kept
   solution, token mean over the step's kept tokens (global count, as GRPO/SFT). The
   vision tower is frozen by default (``model.freeze_vision=true``).

Rounds (the default, as the paper runs them; ``vlreason.train.sophia_rounds``): after
``sophia.warmup_steps`` warm-up SFT steps on rows' own ``solution`` (default 2), each of
``sophia.rounds`` rounds (default 1) collects ``sophia.rows_per_round`` rows (default 8)
with the VLM frozen, writes them to ``<output_dir>/rounds/round-NNN`` (``kept/`` canonical
dataset with ``solution``, ``collected.jsonl``, ``summary.json``) and then trains
``sophia.steps_per_round`` steps on the kept rows; ``max_steps`` = warmup_steps + rounds x
steps_per_round. ``sophia.rounds=0`` is the chunked mode: each step collects
``prompts_per_step`` rows and at once updates on them (later chunks are captioned by the
partly updated VLM). ``sophia.grpo_steps`` > 0 adds the paper's "+GRPO" stage: that many
GRPO steps (the ``grpo:`` section, ``vlreason.train.grpo.GRPOPhases``; G and length from
``rollout``) on ``data.train`` after the SOPHIA steps, logged with ``sophia/grpo`` = 1.
Collection (steps 1-4) lives in ``vlreason.train.sophia_collect``,
the config in ``vlreason.train.sophia_config``.

A step where nothing is kept has loss 0 and no update: the step hands the loop a single
``None`` micro-batch whose loss is a zero leaf tensor; no parameter receives a gradient
and AdamW skips parameters without one (with several processes the loop all-reduces zero
gradients, so weight decay still applies there).

Logged: ``loss``, ``nll``, ``sophia/kept_rows`` (rows with a kept solution this step),
``sophia/kept_frac``, ``sophia/kept_rows_total``, ``sophia/caption_reward`` (mean R(c)),
``sophia/captions_above_threshold``, ``sophia/solution_acc`` (mean R(y)),
``sophia/kept_tokens``, ``sophia/kept_too_long``, ``sophia/kept_malformed``,
``sophia/solution_format`` (fraction of solutions in the strict format), ``caption_len``,
``data/skipped_rows``, ``sophia/reasoner_failed`` (captions the reasoner failed on after
its retries: counted, left out of the caption reward and the selection, never filled
in), ``reasoner/cache_hits`` / ``cache_misses`` / ``calls`` (answered prompts are cached
on disk in ``<output_dir>/reasoner_cache``, so a resumed or repeated round asks the
reasoner nothing twice: ``vlreason.reasoner_cache``), ``reasoner/requests`` /
``retries`` / ``prompt_tokens`` / ``completion_tokens`` (an OpenAI-compatible server),
``time/*``.

Embedded default: the warm tiny VLM (assets/warm-tiny) and, as reasoner, a tiny RANDOM
text LM built offline into the vlreason cache: its solutions are noise and almost never
correct, so the default run is an end-to-end smoke test (under a minute on CPU), not a
demonstration of learning. Point ``reasoner`` at a real model for that (docs/sophia.md).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlreason.algorithms import policy_gradient_loss
from vlreason.algorithms.sophia import Selection, select_solutions  # noqa: F401  (re-exported)
from vlreason.config import doc
from vlreason.data.stream import RowStream, shard
from vlreason.models.loading import ModelConfig
from vlreason.reasoner_cache import with_cache
from vlreason.reasoners import Reasoner, ReasonerConfig, build_reasoner
from vlreason.recipe_base import Recipe, RunConfig, load_split, run_recipe_cli
from vlreason.registry import register_recipe
from vlreason.rollout.batch import RolloutBatch
from vlreason.rollout.policy import RolloutConfig
from vlreason.rollout.prompts import tokenize_targets
from vlreason.train.distributed import global_sum, world
from vlreason.train.grpo import GRPOConfig, GRPOPhases
from vlreason.train.loop import OptimConfig, Trainer
from vlreason.train.metrics import StepTimer
from vlreason.train.rows import RowGate
from vlreason.train.sophia_collect import SophiaCollector, format_choices, reasoner_question  # noqa: F401
from vlreason.train.sophia_config import (  # noqa: F401
    REWARDS,
    SOLUTION_TEMPLATE,
    HardReasonerConfig,
    SophiaConfig,
)
from vlreason.train.sophia_rounds import SophiaRounds

log = logging.getLogger(__name__)


@dataclass
class SophiaRecipeConfig(RunConfig):
    # shared keys (help in RunConfig), restated with this recipe's defaults
    output_dir: str = "runs/sophia"
    max_steps: int = doc("Optimizer steps; with sophia.rounds > 0 (the default) set to sophia.warmup_steps + "
                         "sophia.rounds x sophia.steps_per_round + sophia.grpo_steps.", 4)
    save_steps: int = 0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(freeze_vision=True),
                               metadata={"help": "The trained VLM (captioner and student); vision tower frozen."})
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(num_generations=2, max_new_tokens=32, temperature=1.0),
        metadata={"help": "Images and prompt format of the VLM (captions use sophia.caption_*)."},
    )
    prompts_per_step: int = doc("Rows per optimizer step, over all processes: captioned, reasoned about and "
                                "trained on (chunked mode), trained on (rounds, warm-up) or sampled (the GRPO "
                                "stage).", 4)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    # SOPHIA's own
    sophia: SophiaConfig = field(default_factory=SophiaConfig, metadata={"help": "Captions, reasoning, selection."})
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig, metadata={"help": "The external text reasoner."})
    reasoner_hard: HardReasonerConfig = field(
        default_factory=HardReasonerConfig,
        metadata={"help": "Optional second reasoner for hard rows (easy/hard routing by sophia.difficulty_key)."})
    grpo: GRPOConfig = field(
        default_factory=GRPOConfig,
        metadata={"help": "The GRPO stage after SOPHIA (sophia.grpo_steps > 0; rollout.num_generations / "
                          "max_new_tokens are its G and length; kl_coef must stay 0)."})

    def validate(self) -> None:
        super().validate()
        s = self.sophia
        if s.rounds > 0:
            self.max_steps = s.warmup_steps + s.rounds * s.steps_per_round + s.grpo_steps
        elif s.rows_per_round > 0:
            self.max_steps = s.warmup_steps + math.ceil(s.rows_per_round / self.prompts_per_step) + s.grpo_steps
        if s.warmup_steps + s.grpo_steps >= self.max_steps:
            raise ValueError(f"sophia.warmup_steps={s.warmup_steps} + sophia.grpo_steps={s.grpo_steps} leave no "
                             f"SOPHIA step of max_steps={self.max_steps}")
        if s.grpo_steps > 0 and self.grpo.kl_coef > 0:
            raise ValueError("grpo.kl_coef > 0 is not supported in the SOPHIA recipe's GRPO stage (no reference "
                             "model is kept); run recipes/grpo.py on the SOPHIA result for a KL term")


@register_recipe("sophia")
class SophiaRecipe(SophiaRounds, SophiaCollector, Recipe):
    config_class = SophiaRecipeConfig

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.start_policy()
        self.reasoner: Reasoner = with_cache(build_reasoner(cfg.reasoner), cfg.reasoner, cfg.output_dir,
                                             rank=world()[0])
        self.reasoner_hard: Reasoner | None = None
        if cfg.reasoner_hard.kind:  # its own cache directory: <output_dir>/reasoner_hard/reasoner_cache
            self.reasoner_hard = with_cache(build_reasoner(cfg.reasoner_hard), cfg.reasoner_hard,
                                            Path(cfg.output_dir) / "reasoner_hard", rank=world()[0])
        if cfg.sophia.max_target_tokens <= cfg.sophia.solution_max_new_tokens:
            log.warning("sophia.max_target_tokens=%d <= sophia.solution_max_new_tokens=%d: kept solutions "
                        "longer than %d VLM tokens are rejected (sophia/kept_too_long), not trained on; "
                        "raise sophia.max_target_tokens to train on long solutions",
                        cfg.sophia.max_target_tokens, cfg.sophia.solution_max_new_tokens,
                        cfg.sophia.max_target_tokens - 1)
        self.reward_fn = REWARDS[cfg.sophia.reward]
        self.stream = RowStream(load_split(cfg.data.train, "train"), seed=cfg.seed)
        self.warmup_stream: RowStream | None = None
        if cfg.sophia.warmup_steps > 0:
            warm = load_split(cfg.sophia.warmup_data or cfg.data.train, "train")
            warm = warm.filter(lambda row: bool(row["solution"]), keep_in_memory=True)  # never write a cache next to the data
            if len(warm) == 0:
                raise ValueError("sophia.warmup_steps > 0 but the warm-up data has no row with a `solution`")
            self.warmup_stream = RowStream(warm, seed=cfg.seed + 1, name="warmup")
        self.rows = RowGate(self.stream, self.policy.processor.tokenizer)  # skipped_rows counts here
        self.kept_rows_total = 0
        self.reasoner_failed_total = 0
        self.round_cache: tuple[int, list[dict[str, Any]]] | None = None
        self.grpo: GRPOPhases | None = None
        if cfg.sophia.grpo_steps > 0:  # its own stream over data.train, its own state
            self.grpo_stream = RowStream(load_split(cfg.data.train, "train"), seed=cfg.seed + 2, name="grpo")
            self.grpo = GRPOPhases(cfg.grpo, self.policy, self.grpo_stream, cfg.seed,
                                   prompts_per_step=cfg.prompts_per_step)
        self.in_grpo = False
        if cfg.sophia.rounds > 0 and world()[1] > 1:
            raise ValueError("sophia.rounds > 0 runs on one process for now (use rounds=0 with several)")
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained)

    def cleanup(self) -> None:
        self.policy = self.model = self.trainer = self.reasoner = None

    # ---- collection ----------------------------------------------------------------------
    # ---- the loop's recipe interface -----------------------------------------------------
    def prepare(self, step: int, timer: StepTimer) -> tuple[list[Any], dict[str, Any]]:
        s = self.cfg.sophia
        self.in_grpo = step >= self.cfg.max_steps - s.grpo_steps
        if self.in_grpo:  # the "+GRPO" stage: GRPO's own rollout, rewards and loss
            micro, metrics = self.grpo.prepare(step, timer)
            return micro, {**metrics, "sophia/grpo": 1, "data/skipped_rows": self.skipped_rows + self.grpo.skipped_rows}
        if step < s.warmup_steps:  # warm-up SFT: the rows' own solutions, same update
            rows = shard(self.warmup_stream.next_rows(self.cfg.prompts_per_step), *world())
            tok = self.policy.processor.tokenizer
            fits = [r for r in rows if len(tok(r["solution"], add_special_tokens=False)["input_ids"]) < s.max_target_tokens]
            kept_rows, kept_texts = fits, [r["solution"] for r in fits]
            metrics = {"sophia/warmup": 1, "sophia/warmup_too_long": len(rows) - len(fits)}
        elif s.rounds > 0:
            kept_rows, kept_texts, metrics = self.round_batch(step - s.warmup_steps, timer)
            rows = kept_rows
        else:
            rows, selections, metrics = self.collect(step - s.warmup_steps, timer)
            kept_rows = [r for r, sel in zip(rows, selections) if sel.kept is not None]
            kept_texts = [sel.kept for sel in selections if sel.kept is not None]
            self.kept_rows_total += int(global_sum(len(kept_rows)))
        micro: list[RolloutBatch | None] = []
        with timer("targets"):
            for i in range(0, len(kept_rows), s.micro_batch_prompts):
                part = kept_rows[i:i + s.micro_batch_prompts]
                ids, mask, truncated = tokenize_targets(self.policy.processor, kept_texts[i:i + s.micro_batch_prompts],
                                                        max_tokens=s.max_target_tokens)
                if truncated.any():  # selection rejects over-long solutions: never train on a cut one
                    raise RuntimeError("a kept SOPHIA solution is longer than sophia.max_target_tokens")
                micro.append(RolloutBatch(prompts=self.policy.prompts(part), group_ids_N=torch.arange(len(part)),
                                          completion_ids_NT=ids, completion_mask_NT=mask, truncated_N=truncated,
                                          texts=kept_texts[i:i + s.micro_batch_prompts]))
        tokens = sum(int(b.completion_mask_NT.sum()) for b in micro)
        self.normaliser = global_sum(tokens)
        metrics.update({
            "sophia/kept_rows": len(kept_rows),
            "sophia/kept_frac": len(kept_rows) / max(len(rows), 1),
            "sophia/kept_rows_total": self.kept_rows_total,
            "sophia/kept_tokens": tokens,
            "data/skipped_rows": self.skipped_rows,
            "data/epoch": self.stream.epoch,
        })
        # nothing kept: one None micro-batch -> a zero loss without graph, no gradient, no update
        return micro or [None], metrics

    def step(self, micro_batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.in_grpo:
            return self.grpo.loss(micro_batch)
        if micro_batch is None:
            return torch.zeros((), requires_grad=True), {}
        out = self.policy.token_outputs(micro_batch)  # scored at temperature 1: the NLL of the solution
        mask = micro_batch.completion_mask_NT.to(out.logprobs_NT.device)
        ones = torch.ones(mask.shape[0], device=mask.device)
        loss, m = policy_gradient_loss(out.logprobs_NT, None, ones, mask, agg_mode="token-mean",
                                       global_count=self.normaliser / world()[1])
        return loss, {"nll": float(-m["logprob_mean"])}

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"data": self.stream.state_dict(), "skipped_rows": self.skipped_rows,
                 "kept_rows_total": self.kept_rows_total, "reasoner_failed_total": self.reasoner_failed_total}
        if self.warmup_stream is not None:
            state["warmup_data"] = self.warmup_stream.state_dict()
        if self.grpo is not None:
            state["grpo_data"], state["grpo_skipped_rows"] = self.grpo_stream.state_dict(), self.grpo.skipped_rows
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "data" in state:
            self.stream.load_state_dict(state["data"])
        self.skipped_rows = state.get("skipped_rows", 0)
        self.kept_rows_total = state.get("kept_rows_total", 0)
        self.reasoner_failed_total = state.get("reasoner_failed_total", 0)
        if self.warmup_stream is not None and "warmup_data" in state:
            self.warmup_stream.load_state_dict(state["warmup_data"])
        if self.grpo is not None and "grpo_data" in state:
            self.grpo_stream.load_state_dict(state["grpo_data"])
            self.grpo.skipped_rows = state.get("grpo_skipped_rows", 0)


if __name__ == "__main__":
    sys.exit(run_recipe_cli(SophiaRecipe, sys.argv[1:], name="sophia"))
