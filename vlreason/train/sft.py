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
from vlreason.data.stream import RowStream, shard
from vlreason.rollout.batch import RolloutBatch
from vlreason.rollout.policy import Policy
from vlreason.rollout.prompts import decode_row_images, refuse_special_tokens, tokenize_targets
from vlreason.train.distributed import global_sum, world
from vlreason.train.metrics import StepTimer

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    batch_size: int = doc("Rows per optimizer step, over all processes.", 8)
    micro_batch_size: int = doc("Rows per forward/backward micro-batch.", 8)
    target: str = doc("solution (the row's full reference response) | answer (the bare answer).", "solution")
    answer_template: str = doc("Target text when target=answer; {answer} is replaced.", "{answer}")
    max_target_tokens: int = doc("Targets are cut to this many tokens (counted in metrics).", 512)

    def validate(self) -> None:
        if self.target not in ("solution", "answer"):
            raise ValueError("sft.target must be 'solution' or 'answer'")


def target_text(row: dict[str, Any], cfg: SFTConfig) -> str:
    if cfg.target == "solution":
        if not row.get("solution"):
            raise ValueError(f"row '{row.get('id')}' has no solution; use sft.target=answer or add solutions")
        return row["solution"]
    return cfg.answer_template.format(answer=row["answer"])


class SFTPhases:
    def __init__(self, cfg: SFTConfig, policy: Policy, stream: RowStream):
        self.cfg = cfg
        self.policy = policy
        self.stream = stream

    def usable(self, step: int, row: dict[str, Any]) -> list | None:
        """The row's decoded images, or None (warning, counted) when the row cannot be
        used: an image that does not decode, a special token written in its text, no
        target."""
        try:
            images = decode_row_images(row)
            refuse_special_tokens(row, self.policy.processor.tokenizer)
            target_text(row, self.cfg)
        except ValueError as err:
            log.warning("step %d: skipping row '%s': %s", step + 1, row.get("id"), err)
            return None
        return images

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
        rank, size = world()
        with timer("data"):
            drawn = shard(self.stream.next_rows(self.cfg.batch_size), rank, size)
            checked = [(row, self.usable(step, row)) for row in drawn]
            rows = [row for row, images in checked if images is not None]
            images = [images for _, images in checked if images is not None]
            if not rows:
                raise RuntimeError(f"step {step + 1}: none of this step's rows could be used (see warnings)")
            size_ = self.cfg.micro_batch_size
            micro = [self.batch_for(rows[i : i + size_], images[i : i + size_]) for i in range(0, len(rows), size_)]
        tokens = sum(int(b.completion_mask_NT.sum()) for b in micro)
        self.normaliser = global_sum(tokens)
        truncated = sum(int(b.truncated_N.sum()) for b in micro)
        return micro, {"target_tokens": tokens, "target_truncated": truncated, "data/epoch": self.stream.epoch,
                       "data/skipped_rows_step": len(drawn) - len(rows)}

    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.policy.token_outputs(batch)
        mask = batch.completion_mask_NT.to(out.logprobs_NT.device)
        loss = aggregate(-out.logprobs_NT, mask, "token-mean", global_count=self.normaliser / world()[1])
        nll_sum, count = aggregate_sum_and_count(-out.logprobs_NT.detach(), mask, "token-mean")
        return loss, {"nll": float(nll_sum / count.clamp(min=1))}
