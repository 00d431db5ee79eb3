"""SOPHIA's collection (recipes/sophia.py): the VLM captions each row's image(s) without
seeing the question, the text reasoner(s) solve from caption + question, every solution
is normalised and scored and each row's selection made (vlreason.algorithms.sophia).

:class:`SophiaCollector` is a mixin: the owner provides ``cfg`` (with ``seed`` and
``sophia``), ``policy``, ``model``, ``reasoner``, ``reasoner_hard`` (or None),
``reward_fn``, ``stream``, ``skipped_rows`` and ``reasoner_failed_total``."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from typing import Any

from vlreason.algorithms.sophia import Selection, select_solutions
from vlreason.data.schema import IMAGE_PLACEHOLDER
from vlreason.reasoners import normalise_solution, think_left_open
from vlreason.rewards import accuracy_reward
from vlreason.rewards.format import is_strict_format
from vlreason.rollout.generate import SamplingConfig
from vlreason.rollout.prompts import build_prompt_batch
from vlreason.train.distributed import hash_seed, world
from vlreason.train.metrics import StepTimer
from vlreason.train.rows import SkippedRows

log = logging.getLogger(__name__)


def format_choices(choices: list[str] | None) -> str:
    return "".join(f"{chr(65 + i)}. {c}\n" for i, c in enumerate(choices or []))


_PLACEHOLDER = re.compile(r"[ \t]*" + re.escape(IMAGE_PLACEHOLDER) + r"[ \t]*")


def reasoner_question(question: str) -> str:
    """The question as the reasoner sees it: it gets no images, so no image markers."""
    return _PLACEHOLDER.sub(" ", question).strip()



class SophiaCollector(SkippedRows):
    """Captions, reasoner solutions, rewards and selections (see the module docstring)."""

    def usable_rows(self, step: int, rows: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], list]:
        """This process's share of the step's rows (``rows``, else ``prompts_per_step`` drawn
        from the stream) through the row gate (``self.rows``), and their decoded images:
        rows whose images do not decode, whose text holds a special token or whose prompt
        is over the limit are counted in ``skipped_rows`` and logged."""
        taken = self.rows.draw(step, self.cfg.prompts_per_step) if rows is None else self.rows.admit(step, rows)
        if taken.rows:
            lengths = self.policy.prompts(taken.rows, images=taken.images).attention_mask_PT.sum(-1).tolist()
            taken = self.rows.within_limit(step, taken, lengths, self.policy.rollout.prompt.max_prompt_tokens)
        return taken.rows, taken.images

    def captions(self, rows: list[dict[str, Any]], images: list, seed: int) -> list[list[str]]:
        """K captions per row from ``sophia.caption_prompt``, without the run's prompt
        template / system prompt (which may quote the question). SOPHIA's prompt does not
        show the question; a prompt holding ``{question}`` (the Vision-R1 cold-start
        builder's) gets the question without image markers and its lettered choices."""
        s = self.cfg.sophia

        def prompt(row: dict[str, Any]) -> str:
            if "{question}" not in s.caption_prompt:
                return s.caption_prompt
            question = reasoner_question(row["question"]) + "\n" + format_choices(row.get("choices"))
            return s.caption_prompt.replace("{question}", question.strip())

        caption_rows = [{**r, "question": prompt(r), "choices": []} for r in rows]
        prompt_cfg = replace(self.policy.rollout.prompt, system_prompt="", template="{question}")
        prompts = build_prompt_batch(caption_rows, self.policy.processor, self.policy.budget, prompt_cfg,
                                     images=images)
        r = self.policy.rollout
        sampling = SamplingConfig(num_generations=s.num_captions, max_new_tokens=s.caption_max_new_tokens,
                                  temperature=s.caption_temperature, top_p=r.top_p, top_k=r.top_k,
                                  share_prefix=r.share_prefix)
        batch = self.policy.sample(prompts, seed=seed, sampling=sampling)  # in eval mode (generate_completions)
        K = s.num_captions
        self.last_captions = [[t.strip() for t in batch.texts[i * K:(i + 1) * K]] for i in range(len(rows))]
        return self.last_captions

    def is_hard(self, row: dict[str, Any]) -> bool:
        """Easy/hard routing: the row's difficulty (a field, else a key of its JSON meta) is
        one of sophia.hard_values; always False without reasoner_hard."""
        if self.reasoner_hard is None:
            return False

        key = self.cfg.sophia.difficulty_key
        value = row.get(key)
        if value in (None, ""):
            try:
                meta = json.loads(row.get("meta") or "{}")
            except (TypeError, ValueError):
                meta = {}
            value = meta.get(key) if isinstance(meta, dict) else None
        return str(value).strip().lower() in {v.lower() for v in self.cfg.sophia.hard_values}

    def pass_rates(self, rows: list[dict[str, Any]], images: list, seed: int) -> list[float]:
        """The VLM's own accuracy on each row's ORIGINAL (image, question) prompt over
        sophia.pass_rate_samples answers sampled at rollout.temperature / max_new_tokens."""
        s, r = self.cfg.sophia, self.policy.rollout
        sampling = SamplingConfig(num_generations=s.pass_rate_samples, max_new_tokens=r.max_new_tokens,
                                  temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, share_prefix=r.share_prefix)
        texts = self.policy.sample(self.policy.prompts(rows, images=images), seed=seed + 1, sampling=sampling).texts
        n = s.pass_rate_samples
        return [sum(float(accuracy_reward(t, row["answer"], choices=row.get("choices") or None))
                    for t in texts[i * n:(i + 1) * n]) / n for i, row in enumerate(rows)]

    def hard_rows(self, rows: list[dict[str, Any]], images: list, seed: int) -> list[bool]:
        """Which rows go to reasoner_hard (all False without it): by difficulty field, or by
        the VLM's pass rate (``self.last_pass_rates``)."""
        s = self.cfg.sophia
        self.last_pass_rates: list[float] = []
        if self.reasoner_hard is None:
            return [False] * len(rows)
        if s.route_by == "pass_rate":
            self.last_pass_rates = self.pass_rates(rows, images, seed)
            return [p < s.hard_below for p in self.last_pass_rates]
        return [self.is_hard(row) for row in rows]

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

    def collect(self, step: int, timer: StepTimer, rows: list[dict[str, Any]] | None = None
                ) -> tuple[list[dict[str, Any]], list[Selection], dict[str, Any]]:
        """Collect ``rows`` (default: the step's rows from the stream): captions, solutions,
        rewards, selections; returns (usable rows, their selections, metrics)."""
        s, cfg = self.cfg.sophia, self.cfg
        rank, _ = world()
        seed = hash_seed(cfg.seed, step, rank)
        rows, images = self.usable_rows(step, rows)  # images decoded once, for every prompt below
        self.last_rows = rows
        if not rows:
            return [], [], {}
        with timer("captions"):
            captions = self.captions(rows, images, seed)
        prompts = [self.solution_prompt(row, c) for row, caps in zip(rows, captions) for c in caps]
        before = self.reasoner_counts()
        with timer("routing"):
            hard = [h for h in self.hard_rows(rows, images, seed) for _ in range(s.num_captions)]
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
        # per row, per caption: the normalised solutions and their rewards (written by rounds)
        self.last_solutions, self.last_rewards = [], []
        with timer("rewards"):
            for i, row in enumerate(rows):
                sols = flat[i * K:(i + 1) * K]
                rewards = [[float(self.reward_fn(y, row["answer"], choices=row.get("choices") or None))
                            for y in ys] for ys in sols]
                self.last_solutions.append(sols)
                self.last_rewards.append(rewards)
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
            **({"sophia/vlm_pass_rate": sum(self.last_pass_rates) / len(self.last_pass_rates)}
               if self.last_pass_rates else {}),
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

