"""Vision-R1 cold-start data by "modality bridging" (arXiv 2503.06749; METHODS.md), built
with SOPHIA's machinery (vlreason.train.sophia_collect / sophia_rounds).

    python -m data_pipelines.cold_start [--config FILE] [key=value ...]
    python -m data_pipelines.cold_start reasoner.kind=openai reasoner.base_url=http://127.0.0.1:8000/v1 \\
        reasoner.model=deepseek-ai/DeepSeek-R1 data=/data/vqa model.name_or_path=/ckpt/qwen2.5-vl-7b

1. the VLM (``model``) writes ``bridge.num_captions`` detailed descriptions of each row's
   image(s) with a pseudo chain of thought (``bridge.caption_prompt``; unlike SOPHIA's
   captions it SHOWS the question: ``{question}``);
2. the text reasoner (``reasoner``: transformers, any OpenAI-compatible server, or a
   ``module:factory``; cached on disk like SOPHIA's) reasons from description + question
   (``bridge.solution_template``), ``bridge.num_solutions`` times per description; every
   solution is normalised to ``<think>...</think><answer>...</answer>``;
3. a row is kept when one of its solutions is in the strict format AND its answer is
   correct (``bridge.reward=hard``, ``bridge.threshold=0``: any description with a correct
   solution qualifies); the kept solution is the shortest such one that fits
   ``bridge.max_target_tokens`` (never cut), as in SOPHIA's selection.

Written under ``output_dir`` (default ``runs/cold_start_data``): ``data/kept/`` is the
canonical dataset (the kept rows with ``solution``; ``meta`` gains ``cold_start``, the
description and its reward) for ``vlreason train sft`` or
``vlreason train vision_r1 cold_start.data=<output_dir>/data/kept``; ``data/collected.jsonl``
holds every row (descriptions, solutions, rewards, why nothing was kept);
``data/summary.json`` the counts (rows, kept, rejected as malformed / too long, reasoner
failures, skipped rows, reasoner calls and cache hits, tokens); ``reasoner_cache/`` makes a
rerun ask the reasoner nothing. Rows are processed in dataset order, ``chunk_rows`` at a
time (``max_rows`` > 0: only the first ones).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vlreason.config import doc, load_config
from vlreason.models.loading import ModelConfig
from vlreason.paths import warm_model
from vlreason.reasoner_cache import with_cache
from vlreason.reasoners import ReasonerConfig, build_reasoner
from vlreason.recipe_base import load_policy, load_split
from vlreason.rollout.policy import RolloutConfig
from vlreason.train.metrics import StepTimer
from vlreason.train.rows import RowGate
from vlreason.train.sophia_collect import SophiaCollector
from vlreason.train.sophia_config import REWARDS, SophiaConfig
from vlreason.train.sophia_rounds import SophiaRounds, write_collection

log = logging.getLogger(__name__)

DESCRIPTION_PROMPT = (
    "Describe the image in detail: every object, its colour, position and count, and any text or "
    "numbers. Then reason step by step about what the description implies for this question, "
    "without giving a final answer.\nQuestion: {question}"
)
BRIDGE_TEMPLATE = (
    "Here is a detailed description of an image, with a first analysis:\n{caption}\n\n"
    "Question: {question}\n{choices}"
    "Answer as if you could see the image. Think step by step, then answer, in the format "
    "<think>...</think><answer>...</answer>."
)


def _bridge_defaults() -> SophiaConfig:
    return SophiaConfig(caption_prompt=DESCRIPTION_PROMPT, solution_template=BRIDGE_TEMPLATE, num_captions=1,
                        num_solutions=2, caption_max_new_tokens=256, caption_temperature=0.7,
                        solution_max_new_tokens=1024, reward="hard", threshold=0.0, max_target_tokens=2048,
                        rounds=0, warmup_steps=0, rows_per_round=0)


@dataclass
class ColdStartDataConfig:
    output_dir: str = doc("Where the dataset (data/kept), its record and summary and the reasoner cache go.",
                          "runs/cold_start_data")
    data: str = doc("Input canonical dataset (rows with images, question, answer); empty: the demo train split.", "")
    max_rows: int = doc("Only the first N rows (0: all).", 0)
    chunk_rows: int = doc("Rows described and reasoned about per chunk.", 16)
    seed: int = doc("Seed of the descriptions and the reasoner.", 0)
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "The VLM that describes the images (empty: the warm tiny one)."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "Images and prompt format."})
    bridge: SophiaConfig = field(
        default_factory=_bridge_defaults,
        metadata={"help": "SOPHIA's collection keys: caption_* = the description with pseudo-CoT, "
                          "solution_* = the reasoner, reward / threshold / max_target_tokens = what is kept."})
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig, metadata={"help": "The text reasoner."})

    def validate(self) -> None:
        if self.max_rows < 0 or self.chunk_rows < 1:
            raise ValueError("max_rows must be >= 0 and chunk_rows >= 1")


class ColdStartBuilder(SophiaRounds, SophiaCollector):
    """SOPHIA's collector over a dataset read once in order (no training)."""

    def __init__(self, cfg: ColdStartDataConfig):
        if not cfg.model.name_or_path:
            cfg.model.name_or_path = str(warm_model())
        self.build_cfg = cfg
        # the collector reads cfg.sophia / cfg.seed / cfg.output_dir
        self.cfg = SimpleNamespace(sophia=cfg.bridge, seed=cfg.seed, output_dir=cfg.output_dir)
        self.policy = load_policy(cfg)
        self.model = self.policy.model
        self.reasoner = with_cache(build_reasoner(cfg.reasoner), cfg.reasoner, cfg.output_dir, rank=0)
        self.reasoner_hard = None
        self.reward_fn = REWARDS[cfg.bridge.reward]
        self.rows = RowGate(None, self.policy.processor.tokenizer)  # rows are given (admitted), never drawn
        self.reasoner_failed_total = 0

    def build(self) -> Path:
        cfg = self.build_cfg
        dataset = load_split(cfg.data, "train")
        n = len(dataset) if not cfg.max_rows else min(cfg.max_rows, len(dataset))
        chunks = [(c, [dict(dataset[i]) for i in range(c * cfg.chunk_rows, min((c + 1) * cfg.chunk_rows, n))])
                  for c in range(math.ceil(n / cfg.chunk_rows))]
        timer = StepTimer()
        records, kept, summary = self.collect_rows(chunks, timer, {"cold_start": "modality_bridging"})
        summary = {"input": str(cfg.data or "demo train"), "input_rows": n, **summary}
        out = write_collection(Path(cfg.output_dir) / "data", records, kept, summary)
        log.info("cold-start data: %d of %d rows kept (%d skipped, %d malformed, %d too long, %d reasoner "
                 "failures; reasoner %s) -> %s", len(kept), n, summary["skipped_rows"], summary["kept_malformed"],
                 summary["kept_too_long"], summary["reasoner_failed"], summary["reasoner"], out / "kept")
        return out


def build_cold_start_data(overrides: list[str], config: str | None = None) -> Path:
    """Build the dataset from a config file and/or ``key=value`` overrides; returns the
    collection directory (``kept/`` is the dataset)."""
    cfg = load_config(ColdStartDataConfig, config, overrides)
    builder = ColdStartBuilder(cfg)
    return builder.build()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (keys of ColdStartDataConfig)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. reasoner.kind=openai")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = build_cold_start_data(args.overrides, args.config)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    print(f"{summary['kept_rows']} of {summary['input_rows']} rows kept -> {out / 'kept'} "
          f"(summary: {out / 'summary.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
