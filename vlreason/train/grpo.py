"""GRPO's phases on the shared core, for every recipe that runs GRPO (grpo, vision_r1, dvrp).

``GRPOPhases.prepare`` does the no-gradient work of a step (rollout, rewards, group
advantages, reference log-probs) and cuts the result into prompt-aligned
micro-batches; ``GRPOPhases.loss`` is the clipped surrogate (+ k3 KL) of one
micro-batch, normalised by the step's global token / sequence count so that the
micro-batch losses add up to the full-batch loss on any number of processes.

Options (all off by default, ``algorithm.*``):

* **DAPO dynamic sampling** (``dynamic_sampling``): groups whose rewards are all equal
  (zero advantage, no gradient) are dropped and further prompts are sampled, in rounds
  of the same size, until the batch holds the wanted number of informative groups or
  ``dynamic_sampling_max_rounds`` rounds were sampled (then the step trains on what it
  has and says so in a warning and in ``dapo/short``). The surplus of the last round is
  trimmed (first kept groups in round, prompt order). Decisions use global counts, so
  every process runs the same number of rounds. The filter looks at the reward the
  advantages see (task reward + overlong penalty), not at accuracy alone as DAPO's paper
  does: a group is dropped exactly when its advantages are all zero. Rollout metrics
  (``reward``, ``completion_len``...) describe the first round, unfiltered.
* **DAPO overlong reward shaping** (``overlong_cache`` = L_cache > 0): the soft penalty
  of :func:`vlreason.algorithms.dapo.overlong_penalty` with L_max = this rollout's
  length limit is added to every reward (logged as ``reward/overlong``).
* **Several updates per rollout** (``updates_per_rollout`` K, ``mini_batches`` M): one
  rollout of M x ``prompts_per_step`` prompts serves K consecutive loop steps, update u
  training on mini-batch u mod M, ``logp_old`` fixed at the rollout's weights, so the
  ratio and its clipping act from the second update on (:mod:`vlreason.train.reuse`,
  shared with Vision-OPD).
* ``seq-mean-token-sum-norm`` (Dr.GRPO) divides by the rollout's own length limit (a
  PTST stage's ``max_new_tokens`` when the recipe passes one), exposed as ``max_tokens``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vlreason.algorithms import (
    ADVANTAGES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    aggregate_sum_and_count,
)
from vlreason.algorithms.dapo import informative_groups, overlong_penalty, plan_refill, take_first
from vlreason.config import doc
from vlreason.data.stream import RowStream
from vlreason.rewards import get_reward
from vlreason.rollout.batch import RolloutBatch
from vlreason.rollout.policy import Policy
from vlreason.train.distributed import all_reduce, global_sum, hash_seed, world  # noqa: F401 (re-exported)
from vlreason.train.metrics import StepTimer
from vlreason.train.reuse import ReuseConfig, Rollout, RolloutReuse, capture_old_logprobs
from vlreason.train.rows import RowGate, SkippedRows, none_usable

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig(ReuseConfig):
    micro_batch_prompts: int = doc("Prompts (x G completions) per forward/backward micro-batch.", 2)
    advantage: str = doc("grpo (normalise by group std) | drgrpo (no std).", "grpo")
    clip_low: float = doc("PPO clip epsilon below 1.", 0.2)
    clip_high: float = doc("PPO clip epsilon above 1 (DAPO clip-higher: 0.28).", 0.2)
    kl_coef: float = doc("KL-to-reference coefficient beta; 0 loads no reference model.", 0.0)
    kl_estimator: str = doc("k1 | k2 | k3.", "k3")
    aggregation: str = doc("token-mean | seq-mean-token-mean | seq-mean-token-sum-norm.", "token-mean")
    policy_loss: str = doc("Policy loss from vlreason.algorithms.POLICY_LOSSES: grpo (clipped surrogate) | "
                           "pg (policy gradient with the ratio fixed at 1, no clipping).", "grpo")
    reward: str = doc("Reward name (format, accuracy, format_accuracy, vision_r1, iou) or package.module:function.", "format_accuracy")
    dynamic_sampling: bool = doc(
        "DAPO dynamic sampling: drop groups whose rewards are all equal and sample further prompts "
        "until prompts_per_step (x mini_batches) informative groups are kept.", False)
    dynamic_sampling_max_rounds: int = doc(
        "Most sampling rounds per rollout with dynamic_sampling (the first included); when reached, "
        "the step trains on the groups it has (warning, dapo/short=1).", 4)
    overlong_cache: int = doc(
        "DAPO overlong reward shaping: L_cache, the last tokens before the length limit over which "
        "a penalty grows linearly from 0 to -1 (-1 at the limit); 0 turns it off.", 0)
    overlong_penalty_factor: float = doc("Scale of the overlong penalty (DAPO: 1.0).", 1.0)

    def validate(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"algorithm.advantage must be one of {list(ADVANTAGES)}")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"algorithm.policy_loss must be one of {list(POLICY_LOSSES)}, got '{self.policy_loss}'")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"algorithm.kl_estimator must be one of {list(KL_ESTIMATORS)}")
        if self.micro_batch_prompts < 1:
            raise ValueError("algorithm.micro_batch_prompts must be >= 1")
        if self.dynamic_sampling_max_rounds < 1:
            raise ValueError("algorithm.dynamic_sampling_max_rounds must be >= 1")
        if self.overlong_cache < 0 or self.overlong_penalty_factor < 0:
            raise ValueError("algorithm.overlong_cache and overlong_penalty_factor must be >= 0")
        self.validate_reuse()


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


class GRPOPhases(SkippedRows):
    def __init__(self, cfg: GRPOConfig, policy: Policy, stream: RowStream, seed: int, *, prompts_per_step: int):
        self.cfg = cfg
        self.prompts_per_step = prompts_per_step  # the run's prompts_per_step (RunConfig)
        self.policy = policy
        self.stream = stream
        self.seed = seed
        self.reward_fn = get_reward(cfg.reward)
        self.kl_fn = KL_ESTIMATORS[cfg.kl_estimator]
        self.rows = RowGate(stream, policy.processor.tokenizer)
        self.max_tokens = policy.rollout.max_new_tokens  # the Dr.GRPO constant of the current rollout
        self.reuse = RolloutReuse(cfg.updates_per_rollout, cfg.mini_batches)
        self.capture_old = False  # the first update of a reused rollout records logp_old
        if policy.rollout.num_generations == 1 and cfg.advantage == "grpo":
            log.warning("rollout.num_generations=1: every group has one completion, so every "
                        "group-normalised advantage is 0 and GRPO cannot learn; use G >= 2")

    def next_prompts(self, step: int, count: int | None = None):
        """This process's share of the next ``count`` (default ``prompts_per_step``) prompts,
        through the row gate (unusable rows and prompts over the length limit are reported,
        counted and left out). ``self.prompt_index`` holds each kept prompt's index in the
        round's global list."""
        taken = self.rows.draw(step, count or self.prompts_per_step)
        prompts = self.policy.prompts(taken.rows, images=taken.images) if taken.rows else None
        limit = self.policy.rollout.prompt.max_prompt_tokens
        if prompts is not None and bool((prompts.attention_mask_PT.sum(-1) > limit).any()):
            taken = self.rows.within_limit(step, taken, prompts.attention_mask_PT.sum(-1).tolist(), limit)
            prompts = self.policy.prompts(taken.rows, images=taken.images) if taken.rows else None
        if prompts is None:
            raise none_usable(step)
        self.prompt_index = taken.index
        return prompts

    # ---- a step's batch: a fresh rollout, or the next mini-batch of the current one ------
    def prepare(self, step: int, timer: StepTimer, *, num_generations: int | None = None,
                max_new_tokens: int | None = None) -> tuple[list[RolloutBatch], dict[str, Any]]:
        G = num_generations or self.policy.rollout.num_generations
        limit = max_new_tokens or self.policy.rollout.max_new_tokens
        turn = self.reuse.next(step, lambda: self.rollout(step, timer, G, limit), key=(G, limit))
        self.normaliser = turn.normaliser
        self.max_tokens = turn.rollout.max_tokens
        self.capture_old = turn.capture_old
        # DAPO's counts belong to the rollout: logged on its first update only
        metrics = {k: v for k, v in turn.rollout.metrics.items() if turn.update == 0 or not k.startswith("dapo/")}
        metrics.update({"data/skipped_rows": self.skipped_rows, "data/epoch": self.stream.epoch, **turn.metrics()})
        return turn.batch, metrics

    def rollout(self, step: int, timer: StepTimer, G: int, limit: int) -> Rollout:
        """Sample (in rounds, with dynamic sampling), score, shape, filter; then cut into
        mini-batches and micro-batches, with reference and (for K > 1) old log-probs."""
        cfg = self.cfg
        per_round = self.prompts_per_step * cfg.mini_batches
        rounds: list[tuple[RolloutBatch, list[int], list[bool]]] = []  # batch, global prompt index, global flags
        while True:
            r = len(rounds)
            with timer("rollout"):
                prompts = self.next_prompts(step, per_round)
                # round 0 keeps the seeds of a run without dynamic sampling
                seeds = [hash_seed(self.seed, step, r * per_round + i) for i in self.prompt_index]
                batch = self.policy.sample(prompts, seed=seeds, num_generations=G, max_new_tokens=limit)
            with timer("reward"):
                self.score_and_shape(batch, G, limit)
            index = list(self.prompt_index)
            flags = self.global_flags(batch, G, index, per_round) if cfg.dynamic_sampling else [True] * per_round
            rounds.append((batch, index, flags))
            if not cfg.dynamic_sampling or not plan_refill(sum(sum(f) for _, _, f in rounds), per_round,
                                                           len(rounds), cfg.dynamic_sampling_max_rounds):
                break
        metrics = rollout_metrics(rounds[0][0], G)
        chosen = take_first([f for _, _, f in rounds], per_round)
        units = [(r, j) for r, (_, index, _) in enumerate(rounds) for j, gi in enumerate(index) if chosen[r][gi]]
        if cfg.dynamic_sampling:
            sampled = len(rounds) * per_round
            informative = sum(sum(f) for _, _, f in rounds)
            kept = sum(sum(f) for f in chosen)
            metrics.update({"dapo/rounds": len(rounds), "dapo/sampled_groups": sampled,
                            "dapo/dropped_groups": sampled - informative, "dapo/kept_groups": kept,
                            "dapo/short": float(kept < per_round)})
            if kept < per_round:
                log.warning("step %d: dynamic sampling kept %d of %d groups after %d rounds "
                            "(algorithm.dynamic_sampling_max_rounds); %s", step + 1, kept, per_round, len(rounds),
                            "training on those" if kept else "none had unequal rewards: training on the "
                            "first round (all advantages 0; only the KL term acts)")
            if kept == 0:
                units = [(0, j) for j in range(len(rounds[0][1]))]
        minis = self.cut(rounds, units, G, timer)
        normalisers = [global_sum(sum((self._count(b) for b in mini), torch.zeros(()))) for mini in minis]
        capture_old_logprobs(minis, self.old_logprobs, cfg, timer)
        return Rollout(minis, normalisers, metrics, max_tokens=limit)

    def old_logprobs(self, micro: RolloutBatch) -> torch.Tensor:
        return self.policy.token_outputs(micro, temperature=self.policy.sampling_temperature).logprobs_NT

    def score_and_shape(self, batch: RolloutBatch, G: int, limit: int) -> None:
        """Rewards (+ DAPO overlong penalty) and group advantages, written into ``batch``."""
        batch.rewards_N, batch.reward_components = score(self.reward_fn, batch)
        if self.cfg.overlong_cache > 0:
            penalty = overlong_penalty(batch.completion_lengths_N, limit, self.cfg.overlong_cache,
                                       self.cfg.overlong_penalty_factor)
            batch.rewards_N = batch.rewards_N + penalty.to(batch.rewards_N.dtype)
            batch.reward_components["overlong"] = penalty
        batch.advantages_N = ADVANTAGES[self.cfg.advantage](batch.rewards_N, G)

    @staticmethod
    def global_flags(batch: RolloutBatch, G: int, index: list[int], per_round: int) -> list[bool]:
        """Informative flag of every prompt of the round (all processes' shares together)."""
        local = informative_groups(batch.rewards_N, G)
        flags = torch.zeros(per_round, dtype=torch.float64)
        flags[torch.tensor(index, dtype=torch.long)] = local.to(torch.float64)
        if world()[1] > 1:
            flags = all_reduce(flags, "sum")
        return [bool(v > 0) for v in flags.tolist()]

    def cut(self, rounds, units: list[tuple[int, int]], G: int, timer: StepTimer) -> list[list[RolloutBatch]]:
        """Kept groups ``units`` ((round, local prompt)) -> M mini-batches of micro-batches
        (a micro-batch never spans two rounds: each round has its own prompt tensors).
        Reference log-probs are computed once per round on its kept completions. A
        mini-batch with no group on this process gets one fully masked micro-batch, so
        every process runs the same updates."""
        M, per_micro = self.cfg.mini_batches, self.cfg.micro_batch_prompts
        kept = {}
        for r in sorted({r for r, _ in units}):
            kept[r] = self.select_groups(rounds[r][0], [j for rr, j in units if rr == r])
            if self.cfg.kl_coef > 0:
                with timer("reference"):
                    kept[r].ref_logprobs_NT = self.policy.reference_logprobs(kept[r], self.policy.sampling_temperature)
        size = -(-len(units) // M) if units else 0
        minis = []
        for m in range(M):
            part = units[m * size:(m + 1) * size]
            micro = []
            for r in sorted({r for r, _ in part}):
                prompts = [j for rr, j in part if rr == r]
                for start in range(0, len(prompts), per_micro):
                    micro.append(self.select_groups(kept[r], prompts[start:start + per_micro]))
            if not micro:  # nothing here: a masked stand-in (loss 0, same collectives)
                source = next(iter(kept.values()))
                empty = self.select_groups(source, source.group_ids_N[:1].tolist())
                empty.completion_mask_NT = torch.zeros_like(empty.completion_mask_NT)
                micro.append(empty)
            minis.append(micro)
        return minis

    @staticmethod
    def select_groups(batch: RolloutBatch, prompts: list[int]) -> RolloutBatch:
        """The completions of the given (local) prompts, in order; prompt data stays shared."""
        wanted = set(prompts)
        return batch.select([i for i, g in enumerate(batch.group_ids_N.tolist()) if g in wanted])

    def _count(self, batch: RolloutBatch) -> torch.Tensor:
        mask = batch.completion_mask_NT.float()
        return aggregate_sum_and_count(mask, mask, self.cfg.aggregation)[1]

    # ---- the loss -------------------------------------------------------------------------
    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        # scored at the sampling temperature: the ratio and KL compare the sampled policy
        out = self.policy.token_outputs(batch, temperature=self.policy.sampling_temperature)
        return self.loss_from_logprobs(out.logprobs_NT, batch)

    def loss_from_logprobs(self, logprobs_NT: torch.Tensor, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Policy loss (``policy_loss``: the clipped surrogate by default) + beta x KL of a micro-batch whose log-probs (with gradient,
        at the sampling temperature) a recipe has already computed. ``batch.old_logprobs_NT``
        None means this forward runs at the rollout's weights (ratio 1, no extra pass); on
        the first of several updates it is recorded here for the later ones."""
        device = logprobs_NT.device
        mask = batch.completion_mask_NT.to(device)
        # The loop averages gradients over processes; scale so their mean is the global loss.
        count = self.normaliser / world()[1]
        max_tokens = self.max_tokens
        old = batch.old_logprobs_NT.to(device) if batch.old_logprobs_NT is not None else None
        loss, metrics = POLICY_LOSSES[self.cfg.policy_loss](
            logprobs_NT, old, batch.advantages_N.to(device), mask,
            clip_low=self.cfg.clip_low, clip_high=self.cfg.clip_high,
            agg_mode=self.cfg.aggregation, max_tokens=max_tokens, global_count=count,
        )
        if self.capture_old and batch.old_logprobs_NT is None:
            batch.old_logprobs_NT = logprobs_NT.detach().clone()
        if self.cfg.kl_coef > 0:
            kl_BT = self.kl_fn(logprobs_NT, batch.ref_logprobs_NT.to(device))
            kl = aggregate(kl_BT, mask, self.cfg.aggregation, max_tokens=max_tokens, global_count=count)
            loss = loss + self.cfg.kl_coef * kl
            metrics["kl"] = float(kl.detach()) * count / max(self._count(batch).item(), 1e-8)
        return loss, {k: float(v) for k, v in metrics.items()}
