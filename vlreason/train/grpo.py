"""GRPO's phases on the shared core, for every recipe that runs GRPO (grpo, vision_r1, dvrp).

``GRPOPhases.prepare`` does the no-gradient work of a step (rollout, rewards, group
advantages, reference log-probs) and cuts the result into prompt-aligned
micro-batches; ``GRPOPhases.loss`` is the clipped surrogate (+ k3 KL) of one
micro-batch, normalised by the step's global token / sequence count so that the
micro-batch losses add up to the full-batch loss on any number of processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vlreason.algorithms import (
    ADVANTAGES,
    KL_ESTIMATORS,
    aggregate,
    aggregate_sum_and_count,
    clipped_surrogate,
)
from vlreason.config import doc
from vlreason.data.stream import RowStream, shard
from vlreason.rewards import get_reward
from vlreason.rollout.batch import RolloutBatch
from vlreason.rollout.policy import Policy
from vlreason.rollout.prompts import decode_row_images
from vlreason.train.distributed import global_sum, hash_seed, world  # noqa: F401 (re-exported)
from vlreason.train.metrics import StepTimer

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    prompts_per_step: int = doc("Prompts per optimizer step, over all processes.", 4)
    micro_batch_prompts: int = doc("Prompts (x G completions) per forward/backward micro-batch.", 2)
    advantage: str = doc("grpo (normalise by group std) | drgrpo (no std).", "grpo")
    clip_low: float = doc("PPO clip epsilon below 1.", 0.2)
    clip_high: float = doc("PPO clip epsilon above 1 (DAPO clip-higher: 0.28).", 0.2)
    kl_coef: float = doc("KL-to-reference coefficient beta; 0 loads no reference model.", 0.0)
    kl_estimator: str = doc("k1 | k2 | k3.", "k3")
    aggregation: str = doc("token-mean | seq-mean-token-mean | seq-mean-token-sum-norm.", "token-mean")
    reward: str = doc("Reward name (format, accuracy, format_accuracy, vision_r1, iou) or package.module:function.", "format_accuracy")

    def validate(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"algorithm.advantage must be one of {list(ADVANTAGES)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"algorithm.kl_estimator must be one of {list(KL_ESTIMATORS)}")
        if self.prompts_per_step < 1 or self.micro_batch_prompts < 1:
            raise ValueError("algorithm.prompts_per_step and micro_batch_prompts must be >= 1")


def score(reward_fn, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards of every completion, and each named component where the reward has them."""
    rewards, components = [], {}
    groups = batch.group_ids_N.tolist()
    for i, text in enumerate(batch.texts):
        row = batch.prompts.rows[groups[i]]
        info = {"truncated": bool(batch.truncated_N[i]), "choices": row.get("choices") or None, "row": row}
        if hasattr(reward_fn, "score"):  # total and components from one scoring of each component
            total, parts = reward_fn.score(text, row["answer"], **info)
            for name, value in parts.items():
                components.setdefault(name, []).append(float(value))
        else:
            total = reward_fn(text, row["answer"], **info)
        rewards.append(float(total))
    return torch.tensor(rewards), {k: torch.tensor(v) for k, v in components.items()}


def rollout_metrics(batch: RolloutBatch, G: int) -> dict[str, float]:
    rewards = batch.rewards_N
    lengths = batch.completion_lengths_N.float()
    group_std = rewards.view(-1, G).std(-1) if G > 1 else torch.zeros(len(rewards))
    out = {
        "reward": rewards.mean(),
        "reward_std": rewards.std() if len(rewards) > 1 else 0.0,
        "groups_all_equal": (group_std == 0).float().mean(),
        "completion_len": lengths.mean(),
        "completion_len_max": lengths.max(),
        "truncated_frac": batch.truncated_N.float().mean(),
    }
    out.update({f"reward/{k}": v.mean() for k, v in batch.reward_components.items()})
    return {k: float(v) for k, v in out.items()}


class GRPOPhases:
    def __init__(self, cfg: GRPOConfig, policy: Policy, stream: RowStream, seed: int):
        self.cfg = cfg
        self.policy = policy
        self.stream = stream
        self.seed = seed
        self.reward_fn = get_reward(cfg.reward)
        self.kl_fn = KL_ESTIMATORS[cfg.kl_estimator]
        self.skipped_rows = 0
        if policy.rollout.num_generations == 1 and cfg.advantage == "grpo":
            log.warning("rollout.num_generations=1: every group has one completion, so every "
                        "group-normalised advantage is 0 and GRPO cannot learn; use G >= 2")

    def next_prompts(self, step: int):
        """This process's share of the step's prompts. Rows whose image no longer decodes
        or whose prompt is too long are reported, counted and left out (never silently
        dropped, never a crash, never cut through image tokens). ``self.prompt_index``
        holds each kept prompt's index in the step's global list (its sampling seed)."""
        rank, size = world()
        rows, images, index = [], [], []
        step_rows = self.stream.next_rows(self.cfg.prompts_per_step)
        for i in shard(list(range(len(step_rows))), rank, size):
            row = step_rows[i]
            try:
                images.append(decode_row_images(row))
                rows.append(row)
                index.append(i)
            except ValueError as err:
                self.skip(step, row, str(err))
        limit = self.policy.rollout.prompt.max_prompt_tokens
        prompts = self.policy.prompts(rows, images=images) if rows else None
        if prompts is not None and bool((prompts.attention_mask_PT.sum(-1) > limit).any()):
            lengths = prompts.attention_mask_PT.sum(-1).tolist()
            keep = [i for i, n in enumerate(lengths) if n <= limit]
            for i in sorted(set(range(len(rows))) - set(keep)):
                self.skip(step, rows[i], f"prompt has {lengths[i]} tokens (image tokens included) > "
                          f"rollout.prompt.max_prompt_tokens={limit}; prompts are never cut through image tokens")
            rows, images, index = [rows[i] for i in keep], [images[i] for i in keep], [index[i] for i in keep]
            prompts = self.policy.prompts(rows, images=images) if rows else None
        if prompts is None:
            raise RuntimeError(f"step {step + 1}: none of this step's rows could be used (see warnings)")
        self.prompt_index = index
        return prompts

    def skip(self, step: int, row: dict[str, Any], reason: str) -> None:
        self.skipped_rows += 1
        log.warning("step %d: skipping row '%s': %s", step + 1, row.get("id"), reason)

    def prepare(self, step: int, timer: StepTimer, *, num_generations: int | None = None,
                max_new_tokens: int | None = None) -> tuple[list[RolloutBatch], dict[str, Any]]:
        G = num_generations or self.policy.rollout.num_generations
        with timer("rollout"):
            prompts = self.next_prompts(step)
            seeds = [hash_seed(self.seed, step, i) for i in self.prompt_index]  # per prompt, not per process
            batch = self.policy.sample(prompts, seed=seeds, num_generations=G, max_new_tokens=max_new_tokens)
        with timer("reward"):
            batch.rewards_N, batch.reward_components = score(self.reward_fn, batch)
            batch.advantages_N = ADVANTAGES[self.cfg.advantage](batch.rewards_N, G)
        if self.cfg.kl_coef > 0:
            with timer("reference"):
                batch.ref_logprobs_NT = self.policy.reference_logprobs(batch, self.policy.sampling_temperature)
        metrics = rollout_metrics(batch, G)
        metrics["data/skipped_rows"] = self.skipped_rows
        metrics["data/epoch"] = self.stream.epoch
        self.normaliser = global_sum(self._count(batch))  # the global count; each process divides by W
        per_micro = self.cfg.micro_batch_prompts * G
        micro = [batch.select(list(range(i, min(i + per_micro, batch.num_completions))))
                 for i in range(0, batch.num_completions, per_micro)]
        return micro, metrics

    def _count(self, batch: RolloutBatch) -> torch.Tensor:
        mask = batch.completion_mask_NT.float()
        return aggregate_sum_and_count(mask, mask, self.cfg.aggregation)[1]

    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        # scored at the sampling temperature: the ratio and KL compare the sampled policy
        out = self.policy.token_outputs(batch, temperature=self.policy.sampling_temperature)
        return self.loss_from_logprobs(out.logprobs_NT, batch)

    def loss_from_logprobs(self, logprobs_NT: torch.Tensor, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Clipped surrogate (+ beta x KL) of a micro-batch whose log-probs (with gradient,
        at the sampling temperature) a recipe has already computed."""
        device = logprobs_NT.device
        mask = batch.completion_mask_NT.to(device)
        # The loop averages gradients over processes; scale so their mean is the global loss.
        count = self.normaliser / world()[1]
        max_tokens = self.policy.rollout.max_new_tokens
        loss, metrics = clipped_surrogate(
            logprobs_NT, None, batch.advantages_N.to(device), mask,
            clip_low=self.cfg.clip_low, clip_high=self.cfg.clip_high,
            agg_mode=self.cfg.aggregation, max_tokens=max_tokens, global_count=count,
        )
        if self.cfg.kl_coef > 0:
            kl_BT = self.kl_fn(logprobs_NT, batch.ref_logprobs_NT.to(device))
            kl = aggregate(kl_BT, mask, self.cfg.aggregation, max_tokens=max_tokens, global_count=count)
            loss = loss + self.cfg.kl_coef * kl
            metrics["kl"] = float(kl.detach()) * count / max(self._count(batch).item(), 1e-8)
        return loss, {k: float(v) for k, v in metrics.items()}
