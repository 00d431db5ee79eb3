"""Supervised phases on the same loop: cross-entropy on assistant tokens only.

The target of a row is its ``solution`` (a full reference response, e.g.
``<think>...</think><answer>...</answer>``) or, with ``target="answer"``, its bare
answer wrapped by ``answer_template``. The prompt tokens, image tokens included, get
no loss: only the assistant turn (and its end-of-turn token) is scored, through the
same chunked log-prob path as RL, so warm-up and cold start need no second loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vlreason.algorithms import aggregate, aggregate_sum_and_count
from vlreason.config import doc
from vlreason.data.stream import RowStream
from vlreason.rollout.batch import RolloutBatch
from vlreason.rollout.policy import Policy
from vlreason.rollout.prompts import tokenize_targets
from vlreason.train.distributed import global_sum, world
from vlreason.train.metrics import StepTimer
from vlreason.train.rows import RowGate, none_usable

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    micro_batch_prompts: int = doc("Rows per forward/backward micro-batch (the rows per optimizer "
                                   "step are the run's prompts_per_step).", 8)
    target: str = doc("solution (the row's full reference response) | answer (the bare answer).", "solution")
    answer_template: str = doc("Target text when target=answer; {answer} is replaced.", "{answer}")
    max_target_tokens: int = doc("Targets are cut to this many tokens (counted in metrics).", 512)

    def validate(self) -> None:
        if self.target not in ("solution", "answer"):
            raise ValueError("sft.target must be 'solution' or 'answer'")
        if self.micro_batch_prompts < 1:
            raise ValueError("sft.micro_batch_prompts must be >= 1")


def target_text(row: dict[str, Any], cfg: SFTConfig) -> str:
    if cfg.target == "solution":
        if not row.get("solution"):
            raise ValueError(f"row '{row.get('id')}' has no solution; use sft.target=answer or add solutions")
        return row["solution"]
    return cfg.answer_template.format(answer=row["answer"])


class SFTPhases:
    def __init__(self, cfg: SFTConfig, policy: Policy, stream: RowStream, *, prompts_per_step: int):
        self.cfg = cfg
        self.policy = policy
        self.stream = stream
        self.prompts_per_step = prompts_per_step  # the run's (or the phase's) rows per optimizer step
        # a row is usable when its images decode, its text holds no special token, and it has a target
        self.rows = RowGate(stream, policy.processor.tokenizer, check=lambda row: target_text(row, cfg))

    def batch_for(self, rows: list[dict[str, Any]], images: list | None = None) -> RolloutBatch:
        prompts = self.policy.prompts(rows, images=images)
        ids, mask, truncated = tokenize_targets(
            self.policy.processor, [target_text(r, self.cfg) for r in rows], max_tokens=self.cfg.max_target_tokens
        )
        return RolloutBatch(
            prompts=prompts, group_ids_N=torch.arange(len(rows)), completion_ids_NT=ids,
            completion_mask_NT=mask, truncated_N=truncated,
        )

    def prepare(self, step: int, timer: StepTimer) -> tuple[list[RolloutBatch], dict[str, Any]]:
        with timer("data"):
            taken = self.rows.draw(step, self.prompts_per_step)
            if not taken.rows:
                raise none_usable(step)
            rows, images, size = taken.rows, taken.images, self.cfg.micro_batch_prompts
            micro = [self.batch_for(rows[i : i + size], images[i : i + size]) for i in range(0, len(rows), size)]
        tokens = sum(int(b.completion_mask_NT.sum()) for b in micro)
        self.normaliser = global_sum(tokens)
        truncated = sum(int(b.truncated_N.sum()) for b in micro)
        return micro, {"target_tokens": tokens, "target_truncated": truncated, "data/epoch": self.stream.epoch,
                       "data/skipped_rows_step": taken.skipped, "data/skipped_rows": self.rows.skipped}

    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.policy.token_outputs(batch)
        mask = batch.completion_mask_NT.to(out.logprobs_NT.device)
        loss = aggregate(-out.logprobs_NT, mask, "token-mean", global_count=self.normaliser / world()[1])
        nll_sum, count = aggregate_sum_and_count(-out.logprobs_NT.detach(), mask, "token-mean")
        return loss, {"nll": float(nll_sum / count.clamp(min=1))}
