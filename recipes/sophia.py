"""SOPHIA (arXiv 2507.16814): semi-off-policy RL, one round.

    vlreason train sophia [--config FILE] [key=value ...]
    python recipes/sophia.py [--config FILE] [key=value ...]

The behaviour policy is the trainable VLM's own perception plus an external text-only
reasoner (vlreason.reasoners: a local transformers causal LM, any OpenAI-compatible
chat-completions server, or a ``module:factory`` of your own). One step:

1. captions (``time/captions``): draw ``sophia.prompts_per_step`` rows; the VLM writes
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

A "round" is data collection over ``sophia.rows_per_round`` rows; here each loop step
collects ``prompts_per_step`` rows and at once updates on its kept solutions, so the
round is ``ceil(rows_per_round / prompts_per_step)`` steps (``rows_per_round`` > 0 sets
``max_steps``; 0 keeps ``max_steps``). The paper collects the whole round first and then
trains with batch 512; with one update per collected chunk the data are the same, only
later chunks are captioned by the partly updated VLM (the captioner is the trainee).

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
correct, so the default run is an end-to-end smoke test (a few seconds on CPU), not a
demonstration of learning. Point ``reasoner`` at a real model for that (docs/sophia.md).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlreason.algorithms import policy_gradient_loss
from vlreason.algorithms.sophia import Selection, select_solutions
from vlreason.config import doc
from vlreason.data.schema import IMAGE_PLACEHOLDER
from vlreason.data.stream import RowStream, shard
from vlreason.models.loading import ModelConfig
from vlreason.paths import warm_model
from vlreason.reasoner_cache import with_cache
from vlreason.reasoners import (
    Reasoner,
    ReasonerConfig,
    build_reasoner,
    normalise_solution,
    think_left_open,
)
from vlreason.recipe_base import DataConfig, Recipe, load_policy, load_split, run_recipe_cli
from vlreason.registry import register_recipe
from vlreason.rewards import accuracy_reward, hard_format_and_correct
from vlreason.rewards.format import is_strict_format
from vlreason.rollout.batch import RolloutBatch
from vlreason.rollout.generate import SamplingConfig
from vlreason.rollout.policy import RolloutConfig
from vlreason.rollout.prompts import build_prompt_batch, tokenize_targets
from vlreason.train.distributed import global_sum, hash_seed, world
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
from vlreason.train.metrics import StepTimer

log = logging.getLogger(__name__)

REWARDS = {"accuracy": accuracy_reward, "hard": hard_format_and_correct}
SOLUTION_TEMPLATE = (
    "You cannot see the image, but here is a description of it:\n{caption}\n\n"
    "Question: {question}\n{choices}"
    "Answer as if you could see the image. Think first, then answer, in the format "
    "<think>...</think><answer>...</answer>."
)


@dataclass
class SophiaConfig:
    prompts_per_step: int = doc("Rows captioned, reasoned about and trained on per optimizer step, "
                                "over all processes.", 4)
    rows_per_round: int = doc("Rows in the one round; > 0 sets max_steps = ceil(rows_per_round / "
                              "prompts_per_step); 0: max_steps x prompts_per_step.", 0)
    micro_batch_prompts: int = doc("Kept solutions per forward/backward micro-batch.", 4)
    num_captions: int = doc("Captions K per image (paper 8).", 2)
    num_solutions: int = doc("Reasoner solutions N per caption (paper 8).", 2)
    caption_prompt: str = doc("The captioning instruction (the question is NOT shown).",
                              "Describe the image in detail.")
    caption_max_new_tokens: int = doc("Caption length limit in tokens.", 32)
    caption_temperature: float = doc("Caption sampling temperature.", 1.0)
    solution_template: str = doc("Reasoner prompt; {caption}, {question} and {choices} (lettered "
                                 "options, one per line, or nothing) are filled in.", SOLUTION_TEMPLATE)
    solution_max_new_tokens: int = doc("Reasoner solution length limit in tokens (paper up to 32K).", 64)
    solution_temperature: float = doc("Reasoner sampling temperature.", 1.0)
    reward: str = doc("accuracy (the <answer> block matches the answer) | hard (strict "
                      "<think></think><answer></answer> format and correct).", "accuracy")
    threshold: float = doc("Keep solutions only of captions whose reward R(c) is strictly above this.", 0.75)
    warmup_steps: int = doc("Warm-up SFT steps before SOPHIA (the paper warms the VLM up on solutions "
                            "first): each trains on prompts_per_step rows of warmup_data with their `solution` "
                            "as target, the same NLL update as a kept solution; counted in max_steps (rounds / "
                            "rows_per_round add them). 0: no warm-up.", 0)
    warmup_data: str = doc("Warm-up rows (a canonical dataset; rows without `solution` are skipped); "
                           "empty: data.train.", "")
    rounds: int = doc("0: chunked (each step collects prompts_per_step rows and updates on them at once). "
                      "> 0: the paper's rounds: each round first collects rows_per_round rows with the "
                      "VLM frozen (no update until the round is collected), writes them as a dataset "
                      "(<output_dir>/rounds/round-NNN: kept/ canonical dataset with `solution`, "
                      "collected.jsonl, summary.json), then trains steps_per_round steps on its kept rows; "
                      "max_steps = rounds x steps_per_round. A round on disk is reused, not collected again.", 0)
    steps_per_round: int = doc("rounds > 0: optimizer steps per round, each on prompts_per_step kept rows "
                               "(cycling over them in a seeded order).", 4)
    difficulty_key: str = doc("With reasoner_hard: the row field, or else the key of the row's JSON "
                              "`meta`, that holds its difficulty.", "difficulty")
    hard_values: list[str] = doc("With reasoner_hard: difficulty values routed to it (compared as "
                                 "lower-case strings); other rows go to `reasoner`.", ["hard"])
    max_target_tokens: int = doc("Longest kept solution, in VLM tokens with the end-of-turn token; a "
                                 "longer one is rejected, never cut (sophia/kept_too_long). Keep it above "
                                 "solution_max_new_tokens for long reasoners.", 512)

    def validate(self) -> None:
        if min(self.prompts_per_step, self.micro_batch_prompts, self.num_captions, self.num_solutions) < 1:
            raise ValueError("sophia.prompts_per_step, micro_batch_prompts, num_captions and "
                             "num_solutions must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError("sophia.warmup_steps must be >= 0")
        if self.rows_per_round < 0 or self.rounds < 0 or self.steps_per_round < 1:
            raise ValueError("sophia.rows_per_round and rounds must be >= 0, steps_per_round >= 1")
        if self.rounds > 0 and self.rows_per_round < 1:
            raise ValueError("sophia.rounds > 0 needs sophia.rows_per_round >= 1 (rows collected per round)")
        if self.reward not in REWARDS:
            raise ValueError(f"sophia.reward must be one of {list(REWARDS)}, got '{self.reward}'")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"sophia.threshold must lie in [0, 1), got {self.threshold}")
        if min(self.caption_max_new_tokens, self.solution_max_new_tokens, self.max_target_tokens) < 1:
            raise ValueError("sophia token limits must be >= 1")
        if "{caption}" not in self.solution_template or "{question}" not in self.solution_template:
            raise ValueError("sophia.solution_template must contain {caption} and {question}")


@dataclass
class HardReasonerConfig(ReasonerConfig):
    kind: str = doc("Empty: no routing, every row goes to `reasoner`. Otherwise the reasoner for rows "
                    "whose difficulty is in sophia.hard_values (paper: DeepSeek-R1 for hard, QwQ-32B for "
                    "easy); same keys as `reasoner`.", "")

    def validate(self) -> None:
        if self.kind:
            super().validate()


@dataclass
class SophiaRecipeConfig(LoopConfig):
    output_dir: str = doc("Run directory.", "runs/sophia")
    max_steps: int = doc("Optimizer steps (one round; see sophia.rows_per_round).", 4)
    save_steps: int = doc("Checkpoint every N steps (0: only on stop and at the end).", 0)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(freeze_vision=True),
                               metadata={"help": "The trained VLM (captioner and student); vision tower frozen."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Datasets."})
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(num_generations=2, max_new_tokens=32, temperature=1.0),
        metadata={"help": "Images and prompt format of the VLM (captions use sophia.caption_*)."},
    )
    sophia: SophiaConfig = field(default_factory=SophiaConfig, metadata={"help": "Captions, reasoning, selection."})
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig, metadata={"help": "The external text reasoner."})
    reasoner_hard: HardReasonerConfig = field(
        default_factory=HardReasonerConfig,
        metadata={"help": "Optional second reasoner for hard rows (easy/hard routing by sophia.difficulty_key)."})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4),
                               metadata={"help": "Optimizer and schedule."})

    def validate(self) -> None:
        s = self.sophia
        if s.rounds > 0:
            self.max_steps = s.warmup_steps + s.rounds * s.steps_per_round
        elif s.rows_per_round > 0:
            self.max_steps = s.warmup_steps + math.ceil(s.rows_per_round / s.prompts_per_step)
        if s.warmup_steps >= self.max_steps:
            raise ValueError(f"sophia.warmup_steps={s.warmup_steps} leaves no SOPHIA step of max_steps={self.max_steps}")


def format_choices(choices: list[str] | None) -> str:
    return "".join(f"{chr(65 + i)}. {c}\n" for i, c in enumerate(choices or []))


_PLACEHOLDER = re.compile(r"[ \t]*" + re.escape(IMAGE_PLACEHOLDER) + r"[ \t]*")


def reasoner_question(question: str) -> str:
    """The question as the reasoner sees it: it gets no images, so no image markers."""
    return _PLACEHOLDER.sub(" ", question).strip()


@register_recipe("sophia")
class SophiaRecipe(Recipe):
    config_class = SophiaRecipeConfig

    @staticmethod
    def default_model() -> Path:
        return warm_model()

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.policy = load_policy(cfg)
        self.model = self.policy.model
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
            warm = warm.filter(lambda row: bool(row["solution"]))
            if len(warm) == 0:
                raise ValueError("sophia.warmup_steps > 0 but the warm-up data has no row with a `solution`")
            self.warmup_stream = RowStream(warm, seed=cfg.seed + 1, name="warmup")
        self.skipped_rows = 0
        self.kept_rows_total = 0
        self.reasoner_failed_total = 0
        self.round_cache: tuple[int, list[dict[str, Any]]] | None = None
        if cfg.sophia.rounds > 0 and world()[1] > 1:
            raise ValueError("sophia.rounds > 0 runs on one process for now (use rounds=0 with several)")
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained)

    def cleanup(self) -> None:
        self.policy = self.model = self.trainer = self.reasoner = None

    # ---- collection ----------------------------------------------------------------------
    def usable_rows(self, step: int) -> list[dict[str, Any]]:
        """This process's share of the step's rows whose prompt decodes and fits."""
        rank, size = world()
        rows = shard(self.stream.next_rows(self.cfg.sophia.prompts_per_step), rank, size)
        max_tokens = self.policy.rollout.prompt.max_prompt_tokens
        usable = []
        for row in rows:
            try:
                length = int(self.policy.prompts([row]).attention_mask_PT.sum())
            except ValueError as err:
                self.skipped_rows += 1
                log.warning("step %d: skipping row '%s': %s", step + 1, row.get("id"), err)
                continue
            if length > max_tokens:
                self.skipped_rows += 1
                log.warning("step %d: skipping row '%s': prompt has %d tokens > rollout.prompt.max_prompt_tokens=%d",
                            step + 1, row.get("id"), length, max_tokens)
                continue
            usable.append(row)
        return usable

    def captions(self, rows: list[dict[str, Any]], seed: int) -> list[list[str]]:
        """K captions per row from a prompt without the question (nor its choices, nor the
        run's prompt template/system prompt, which may quote them)."""
        s = self.cfg.sophia
        caption_rows = [{**r, "question": s.caption_prompt, "choices": []} for r in rows]
        prompt_cfg = replace(self.policy.rollout.prompt, system_prompt="", template="{question}")
        prompts = build_prompt_batch(caption_rows, self.policy.processor, self.policy.budget, prompt_cfg)
        r = self.policy.rollout
        sampling = SamplingConfig(num_generations=s.num_captions, max_new_tokens=s.caption_max_new_tokens,
                                  temperature=s.caption_temperature, top_p=r.top_p, top_k=r.top_k,
                                  share_prefix=r.share_prefix)
        was_training = self.model.training
        self.model.eval()
        try:
            batch = self.policy.sample(prompts, seed=seed, sampling=sampling)
        finally:
            self.model.train(was_training)
        K = s.num_captions
        self.last_captions = [[t.strip() for t in batch.texts[i * K:(i + 1) * K]] for i in range(len(rows))]
        return self.last_captions

    def is_hard(self, row: dict[str, Any]) -> bool:
        """Easy/hard routing: the row's difficulty (a field, else a key of its JSON meta) is
        one of sophia.hard_values; always False without reasoner_hard."""
        if self.reasoner_hard is None:
            return False
        import json

        key = self.cfg.sophia.difficulty_key
        value = row.get(key)
        if value in (None, ""):
            try:
                meta = json.loads(row.get("meta") or "{}")
            except (TypeError, ValueError):
                meta = {}
            value = meta.get(key) if isinstance(meta, dict) else None
        return str(value).strip().lower() in {v.lower() for v in self.cfg.sophia.hard_values}

    def route_solve(self, prompts: list[str], hard: list[bool], seed: int) -> list[list[str]]:
        """Solutions for each prompt from `reasoner`, or from `reasoner_hard` where ``hard``;
        in prompt order."""
        s = self.cfg.sophia
        out: list[list[str] | None] = [None] * len(prompts)
        for reasoner, want in ((self.reasoner, False), (self.reasoner_hard, True)):
            idx = [i for i, h in enumerate(hard) if h == want]
            if not idx or reasoner is None:
                continue
            got = reasoner.solve([prompts[i] for i in idx], s.num_solutions, s.solution_max_new_tokens,
                                 s.solution_temperature, seed)
            if len(got) != len(idx):
                raise RuntimeError(f"the reasoner returned {len(got)} answers for {len(idx)} prompts")
            for i, sols in zip(idx, got):
                out[i] = sols
        self.last_hard = sum(hard)
        return out  # type: ignore[return-value]

    def reasoner_counts(self) -> dict[str, int]:
        """The reasoners' running counts: cache hits / misses and calls (the cache), HTTP
        requests, retries and reported tokens (an OpenAI-compatible server); ``reasoner/*``
        for ``reasoner``, ``reasoner_hard/*`` for the hard one when routing."""
        counts: dict[str, int] = {}
        for top, prefix in ((self.reasoner, "reasoner/"), (getattr(self, "reasoner_hard", None), "reasoner_hard/")):
            for source in (top, getattr(top, "inner", None)):
                for name in ("cache_stats", "stats"):
                    fn = getattr(type(source), name, None) if source is not None else None
                    if callable(fn):
                        counts.update({prefix + k.removeprefix("reasoner/"): int(v)
                                       for k, v in fn(source).items() if k != "failed_prompts"})
        return counts

    def solution_prompt(self, row: dict[str, Any], caption: str) -> str:
        return self.cfg.sophia.solution_template.format(
            caption=caption or "(empty description)", question=reasoner_question(row["question"]),
            choices=format_choices(row.get("choices")))

    def collect(self, step: int, timer: StepTimer) -> tuple[list[dict[str, Any]], list[Selection], dict[str, Any]]:
        s, cfg = self.cfg.sophia, self.cfg
        rank, _ = world()
        seed = hash_seed(cfg.seed, step, rank)
        rows = self.usable_rows(step)
        if not rows:
            return [], [], {}
        with timer("captions"):
            captions = self.captions(rows, seed)
        prompts = [self.solution_prompt(row, c) for row, caps in zip(rows, captions) for c in caps]
        before = self.reasoner_counts()
        hard = [self.is_hard(row) for row in rows for _ in range(s.num_captions)]
        with timer("reasoner"):
            flat = self.route_solve(prompts, hard, seed)
        # an empty list: the reasoner failed on that prompt (counted, never filled in)
        if len(flat) != len(prompts) or any(len(x) not in (0, s.num_solutions) for x in flat):
            raise RuntimeError(f"the reasoner returned {[len(x) for x in flat]} solutions for {len(prompts)} "
                               f"prompts; expected {s.num_solutions} each (or none for a failed prompt)")
        failed = [len(x) == 0 for x in flat]
        after = self.reasoner_counts()
        # the built-in reasoners already normalise (idempotent); kind=python ones may not
        flat = [[normalise_solution(y, prompt_opened_think=think_left_open(y)) for y in ys] for ys in flat]
        tok = self.policy.processor.tokenizer
        length = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        K = s.num_captions
        selections = []
        with timer("rewards"):
            for i, row in enumerate(rows):
                sols = flat[i * K:(i + 1) * K]
                rewards = [[float(self.reward_fn(y, row["answer"], choices=row.get("choices") or None))
                            for y in ys] for ys in sols]
                selections.append(select_solutions(rewards, sols, threshold=s.threshold, length=length,
                                                   well_formed=is_strict_format,
                                                   max_length=s.max_target_tokens - 1))  # + end of turn
        # captions the reasoner failed on have no reward: they are counted, not averaged in
        all_r = [r for sel in selections for r in sel.caption_rewards]
        all_r = [r for r, f in zip(all_r, failed) if not f] or [0.0]
        answered = max(len(flat) - sum(failed), 1)
        metrics = {
            "sophia/reasoner_failed": sum(failed),
            "sophia/hard_prompts": sum(hard),
            "sophia/reasoner_failed_total": self.reasoner_failed_total + sum(failed),
            **{k: after[k] - before.get(k, 0) for k in after},
            # solutions (after normalisation) in the strict <think></think><answer></answer> format
            "sophia/solution_format": sum(is_strict_format(y) for ys in flat for y in ys) / (answered * s.num_solutions),
            "sophia/kept_malformed": sum(sel.rejected == "malformed" for sel in selections),
            "sophia/kept_too_long": sum(sel.rejected == "too_long" for sel in selections),
            "sophia/caption_reward": sum(all_r) / len(all_r),
            "sophia/captions_above_threshold": sum(r > s.threshold for r in all_r) / len(all_r),
            # mean over captions of their mean = mean over all solutions (N per caption)
            "sophia/solution_acc": sum(all_r) / len(all_r),
            "caption_len": sum(len(tok(c, add_special_tokens=False)["input_ids"])
                               for caps in captions for c in caps) / (len(rows) * K),
        }
        self.reasoner_failed_total += sum(failed)
        return rows, selections, metrics

    # ---- rounds (the paper's collect-then-train) -----------------------------------------
    def round_dir(self, r: int) -> Path:
        return Path(self.cfg.output_dir) / "rounds" / f"round-{r:03d}"

    def collect_round(self, r: int, timer: StepTimer) -> Path:
        """Collect round ``r`` with the VLM as it is now (nothing is updated until the round
        is on disk) and write it: ``kept/`` (a canonical dataset: the kept rows with
        ``solution``), ``collected.jsonl`` (every row: captions, caption rewards, the kept
        solution or why none) and ``summary.json``. Written to a temporary directory and
        renamed, so a round on disk is complete."""
        import json
        import shutil

        from vlreason.data.schema import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, save_canonical

        s = self.cfg.sophia
        out = self.round_dir(r)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        chunks = math.ceil(s.rows_per_round / s.prompts_per_step)
        before = self.reasoner_counts()
        records, kept, sums = [], [], {}
        hist = [0] * 10
        for c in range(chunks):
            rows, selections, metrics = self.collect(1_000_000 * (r + 1) + c, timer)
            for key in ("sophia/kept_malformed", "sophia/kept_too_long", "sophia/reasoner_failed"):
                sums[key] = sums.get(key, 0) + metrics.get(key, 0)
            for row, sel, caps in zip(rows, selections, self.last_captions):
                for cr in sel.caption_rewards:
                    hist[min(int(cr * 10), 9)] += 1
                records.append({"id": row["id"], "question": row["question"], "answer": row["answer"],
                                "captions": caps, "caption_rewards": sel.caption_rewards, "kept": sel.kept,
                                "kept_caption": sel.kept_caption, "rejected": sel.rejected})
                if sel.kept is not None:
                    meta = {"sophia_round": r, "caption": caps[sel.kept_caption],
                            "caption_reward": sel.caption_rewards[sel.kept_caption]}
                    kept.append({**{k: row.get(k) for k in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}, "solution": sel.kept,
                                 "meta": json.dumps(meta, sort_keys=True)})
        after = self.reasoner_counts()
        summary = {"round": r, "rows": len(records), "kept_rows": len(kept),
                   "kept_frac": len(kept) / max(len(records), 1),
                   "caption_reward_hist": {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": n for i, n in enumerate(hist)},
                   "kept_malformed": sums.get("sophia/kept_malformed", 0),
                   "kept_too_long": sums.get("sophia/kept_too_long", 0),
                   "reasoner_failed": sums.get("sophia/reasoner_failed", 0),
                   "reasoner": {k.removeprefix("reasoner/"): after[k] - before.get(k, 0) for k in after}}
        with open(tmp / "collected.jsonl", "w") as f:
            f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        if kept:
            save_canonical(kept, tmp / "kept")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
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
            from vlreason.data.schema import load_canonical

            rows = [dict(x) for x in load_canonical(out / "kept")]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(hash_seed(self.cfg.seed, r, 0)))
        self.round_cache = (r, [rows[i] for i in order.tolist()])
        return self.round_cache[1]

    def round_batch(self, step: int, timer: StepTimer) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
        s = self.cfg.sophia
        r, k = divmod(step, s.steps_per_round)
        rows = self.round_rows(r, timer)
        batch = [rows[(k * s.prompts_per_step + i) % len(rows)] for i in range(s.prompts_per_step)] if rows else []
        metrics: dict[str, Any] = {"sophia/round": r, "sophia/round_kept_rows": len(rows)}
        if k == 0:
            import json

            self.kept_rows_total += len(rows)
            summary = json.loads((self.round_dir(r) / "summary.json").read_text())
            metrics.update({"sophia/round_rows": summary["rows"], "sophia/round_kept_frac": summary["kept_frac"],
                            **{f"reasoner/round_{key}": v for key, v in summary["reasoner"].items()}})
        return batch, [row["solution"] for row in batch], metrics

    # ---- the loop's recipe interface -----------------------------------------------------
    def prepare(self, step: int, timer: StepTimer) -> tuple[list[RolloutBatch | None], dict[str, Any]]:
        s = self.cfg.sophia
        if step < s.warmup_steps:  # warm-up SFT: the rows' own solutions, same update
            rows = shard(self.warmup_stream.next_rows(s.prompts_per_step), *world())
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

    def step(self, micro_batch: RolloutBatch | None) -> tuple[torch.Tensor, dict[str, Any]]:
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
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "data" in state:
            self.stream.load_state_dict(state["data"])
        self.skipped_rows = state.get("skipped_rows", 0)
        self.kept_rows_total = state.get("kept_rows_total", 0)
        self.reasoner_failed_total = state.get("reasoner_failed_total", 0)
        if self.warmup_stream is not None and "warmup_data" in state:
            self.warmup_stream.load_state_dict(state["warmup_data"])


if __name__ == "__main__":
    sys.exit(run_recipe_cli(SophiaRecipe, sys.argv[1:], name="sophia"))
