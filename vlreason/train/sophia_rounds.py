"""SOPHIA's paper rounds (sophia.rounds > 0; recipes/sophia.py): a round is collected in
full with the VLM frozen, written as a dataset of its own under
``<output_dir>/rounds/round-NNN`` (``kept/`` canonical rows with ``solution``,
``collected.jsonl``, ``summary.json``), then trained on. A round on disk is reused.

:class:`SophiaRounds` is a mixin on top of :class:`vlreason.train.sophia_collect.SophiaCollector`."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from vlreason.data.schema import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, load_canonical, save_canonical
from vlreason.train.distributed import hash_seed
from vlreason.train.metrics import StepTimer

log = logging.getLogger(__name__)


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    """The row's JSON ``meta`` as a dict ({} when empty or not a JSON object)."""
    try:
        meta = json.loads(row.get("meta") or "{}")
    except (TypeError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def write_collection(out: Path, records: list[dict[str, Any]], kept: list[dict[str, Any]],
                     summary: dict[str, Any]) -> Path:
    """Write a collection as ``out/``: ``kept/`` (a canonical dataset of the kept rows with
    ``solution``; written even when empty), ``collected.jsonl`` (every row: captions, each
    caption's solutions and their rewards, caption rewards, the kept solution or why none)
    and ``summary.json``. Written to a temporary directory and renamed, so a collection on
    disk is complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "collected.jsonl", "w") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    save_canonical(kept, tmp / "kept")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class SophiaRounds:
    """Collect-then-train rounds (see the module docstring)."""

    def round_dir(self, r: int) -> Path:
        return Path(self.cfg.output_dir) / "rounds" / f"round-{r:03d}"

    def collect_rows(self, chunks: list[tuple[int, list[dict[str, Any]] | None]], timer: StepTimer,
                     tag: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """Collect each chunk ``(seed step, rows or None: drawn from the stream)`` with the VLM
        as it is now; returns (a record per usable row, the kept rows as canonical rows with
        ``solution`` and ``tag`` + caption + caption reward added to their JSON ``meta``, a
        summary: rows, kept rows, caption-reward histogram, rejected / failed / skipped
        counts, the reasoner's counts over the collection)."""
        before, skipped_before = self.reasoner_counts(), self.skipped_rows
        records, kept, sums = [], [], {}
        hist = [0] * 10
        for step, chunk in chunks:
            rows, selections, metrics = self.collect(step, timer, chunk)
            for key in ("sophia/kept_malformed", "sophia/kept_too_long", "sophia/reasoner_failed"):
                sums[key] = sums.get(key, 0) + metrics.get(key, 0)
            for row, sel, caps, sols, rews in zip(rows, selections, self.last_captions, self.last_solutions,
                                                  self.last_rewards):
                for cr in sel.caption_rewards:
                    hist[min(int(cr * 10), 9)] += 1
                records.append({"id": row["id"], "question": row["question"], "answer": row["answer"],
                                "captions": caps, "solutions": sols, "rewards": rews,
                                "caption_rewards": sel.caption_rewards, "kept": sel.kept,
                                "kept_caption": sel.kept_caption, "rejected": sel.rejected})
                if sel.kept is not None:
                    meta = {**_meta(row), **tag, "caption": caps[sel.kept_caption],
                            "caption_reward": sel.caption_rewards[sel.kept_caption]}
                    kept.append({**{k: row.get(k) for k in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}, "solution": sel.kept,
                                 "meta": json.dumps(meta, sort_keys=True)})
        after = self.reasoner_counts()
        summary = {"rows": len(records), "kept_rows": len(kept), "kept_frac": len(kept) / max(len(records), 1),
                   "caption_reward_hist": {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": n for i, n in enumerate(hist)},
                   "kept_malformed": sums.get("sophia/kept_malformed", 0),
                   "kept_too_long": sums.get("sophia/kept_too_long", 0),
                   "reasoner_failed": sums.get("sophia/reasoner_failed", 0),
                   "skipped_rows": self.skipped_rows - skipped_before,
                   "reasoner": {k.removeprefix("reasoner/"): after[k] - before.get(k, 0) for k in after}}
        return records, kept, summary

    def collect_round(self, r: int, timer: StepTimer) -> Path:
        """Collect round ``r`` with the VLM as it is now (nothing is updated until the round
        is on disk) and write it (:func:`write_collection`)."""
        s = self.cfg.sophia
        chunks = [(1_000_000 * (r + 1) + c, None) for c in range(math.ceil(s.rows_per_round / self.cfg.prompts_per_step))]
        records, kept, summary = self.collect_rows(chunks, timer, {"sophia_round": r})
        out = write_collection(self.round_dir(r), records, kept, {"round": r, **summary})
        log.info("SOPHIA round %d collected: %d of %d rows kept -> %s", r, len(kept), len(records), out)
        return out

    def round_rows(self, r: int, timer: StepTimer) -> list[dict[str, Any]]:
        """Round ``r``'s kept rows in a seeded order (collected first when not on disk)."""
        if self.round_cache is not None and self.round_cache[0] == r:
            return self.round_cache[1]
        out = self.round_dir(r)
        if not (out / "summary.json").is_file():
            with timer("collect_round"):
                self.collect_round(r, timer)
        rows: list[dict[str, Any]] = []
        if (out / "kept").is_dir():
            rows = [dict(x) for x in load_canonical(out / "kept")]
        if not rows:
            log.warning("SOPHIA round %d kept no row: its %d steps make no update (loss 0)", r,
                        self.cfg.sophia.steps_per_round)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(hash_seed(self.cfg.seed, r, 0)))
        self.round_cache = (r, [rows[i] for i in order.tolist()])
        return self.round_cache[1]

    def round_batch(self, step: int, timer: StepTimer) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
        s, n = self.cfg.sophia, self.cfg.prompts_per_step
        r, k = divmod(step, s.steps_per_round)
        rows = self.round_rows(r, timer)
        batch = [rows[(k * n + i) % len(rows)] for i in range(n)] if rows else []
        metrics: dict[str, Any] = {"sophia/round": r, "sophia/round_kept_rows": len(rows)}
        if k == 0:
            self.kept_rows_total += len(rows)
            summary = json.loads((self.round_dir(r) / "summary.json").read_text())
            metrics.update({"sophia/round_rows": summary["rows"], "sophia/round_kept_frac": summary["kept_frac"],
                            **{f"reasoner/round_{key}": v for key, v in summary["reasoner"].items()}})
        return batch, [row["solution"] for row in batch], metrics

