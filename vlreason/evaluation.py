"""Evaluate a policy on a canonical dataset: accuracy, format rate, lengths, pass@k.

Greedy decoding by default (one completion per row); with ``num_samples=k`` and a
temperature, each row gets k samples and pass@k (any of the k correct) is reported
next to the mean accuracy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from vlreason.config import doc
from vlreason.rewards.accuracy import accuracy_reward
from vlreason.rewards.format import format_reward
from vlreason.rollout.generate import SamplingConfig
from vlreason.rollout.policy import Policy
from vlreason.rollout.prompts import decode_row_images

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    num_samples: int = doc("Completions per row; 1 with temperature 0 is greedy.", 1)
    temperature: float = doc("Sampling temperature (0 = greedy).", 0.0)
    max_new_tokens: int = doc("Completion length limit.", 64)
    batch_size: int = doc("Rows per generate call.", 16)
    limit: int = doc("Evaluate only the first N rows (0 = all).", 0)
    seed: int = doc("Sampling seed.", 0)
    lenient: bool = doc("Accept answers outside <answer> tags (last line / \\boxed{}).", False)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@torch.no_grad()
def evaluate(policy: Policy, dataset, cfg: EvalConfig, *,
             progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary metrics, one record per completion) of ``policy`` on ``dataset``.

    A row whose image no longer decodes is left out with a warning and counted in
    ``skipped_rows``; every other row is scored."""
    n = len(dataset) if not cfg.limit else min(cfg.limit, len(dataset))
    if n == 0:
        raise ValueError("the evaluation dataset is empty")
    sampling = SamplingConfig(num_generations=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature)
    records, skipped = [], 0
    was_training = policy.model.training
    policy.model.eval()
    for start in tqdm(range(0, n, cfg.batch_size), disable=not progress, desc="eval", unit="batch"):
        rows, images = [], []
        for i in range(start, min(start + cfg.batch_size, n)):
            try:
                images.append(decode_row_images(dataset[i]))
                rows.append(dataset[i])
            except ValueError as err:
                skipped += 1
                log.warning("eval: skipping row '%s': %s", dataset[i].get("id"), err)
        if not rows:
            continue
        rollout = policy.sample(policy.prompts(rows, images=images), seed=cfg.seed + start, sampling=sampling)
        for i, text in enumerate(rollout.texts):
            row = rows[int(rollout.group_ids_N[i])]
            records.append({
                "id": row["id"],
                "completion": text,
                "answer": row["answer"],
                "correct": accuracy_reward(text, row["answer"], choices=row.get("choices") or None, lenient=cfg.lenient),
                "format": format_reward(text),
                "length": int(rollout.completion_lengths_N[i]),
                "truncated": bool(rollout.truncated_N[i]),
            })
    policy.model.train(was_training)
    if not records:
        raise ValueError(f"no evaluation row could be used ({skipped} skipped)")
    return {**summarise(records, cfg.num_samples), "skipped_rows": skipped}, records


def summarise(records: list[dict[str, Any]], k: int) -> dict[str, Any]:
    lengths = [float(r["length"]) for r in records]
    by_row: dict[str, list[float]] = {}
    for r in records:
        by_row.setdefault(r["id"], []).append(r["correct"])
    out = {
        "rows": len(by_row),
        "samples_per_row": k,
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "format_rate": sum(r["format"] for r in records) / len(records),
        "length_mean": sum(lengths) / len(lengths),
        "length_p50": percentile(lengths, 0.5),
        "length_p90": percentile(lengths, 0.9),
        "truncation_rate": sum(r["truncated"] for r in records) / len(records),
    }
    if k > 1:
        out[f"pass@{k}"] = sum(max(v) for v in by_row.values()) / len(by_row)
    return out
