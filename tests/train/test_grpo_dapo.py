"""GRPOPhases with DAPO dynamic sampling, overlong shaping, several updates per rollout
and the Dr.GRPO constant, on a scripted policy (no model): every number is hand-worked.

The scripted policy answers each row with the completions listed in the row itself
(``texts``, ``lengths``); the reward is 1 for a completion equal to the row's answer.
Its log-probs are ``theta * token position``, so an optimizer step on ``theta`` changes
them and the PPO ratio shows it.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from vlreason.data.stream import RowStream
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.forward import TokenOutputs
from vlreason.train.grpo import GRPOConfig, GRPOPhases
from vlreason.train.metrics import StepTimer

G = 2


class ScriptedPolicy:
    def __init__(self, max_new_tokens=8):
        self.rollout = SimpleNamespace(num_generations=G, max_new_tokens=max_new_tokens,
                                       prompt=SimpleNamespace(max_prompt_tokens=100))
        self.sampling_temperature = 1.0
        self.processor = SimpleNamespace(tokenizer=None)  # no special tokens to refuse
        self.theta = torch.nn.Parameter(torch.tensor(-0.1))
        self.sampled = []  # ids of the rows sampled, round by round
        self.limits = []  # max_new_tokens of every sample() call
        self.old_passes = 0

    def prompts(self, rows, images=None):
        n = len(rows)
        return PromptBatch(torch.ones(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.long), None, None, None,
                           [0] * n, [dict(r) for r in rows])

    def sample(self, prompts, *, seed, num_generations, max_new_tokens):
        self.sampled.append([r["id"] for r in prompts.rows])
        self.limits.append(max_new_tokens)
        texts, lengths, groups = [], [], []
        for p, row in enumerate(prompts.rows):
            texts += row["texts"][:num_generations]
            lengths += row["lengths"][:num_generations]
            groups += [p] * num_generations
        T = max(lengths)
        mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
        return RolloutBatch(prompts, torch.tensor(groups), torch.zeros_like(mask), mask,
                            torch.tensor([n >= max_new_tokens for n in lengths]), texts)

    def token_outputs(self, batch, temperature=1.0):
        T = batch.completion_mask_NT.shape[1]
        if not torch.is_grad_enabled():
            self.old_passes += 1
        positions = torch.arange(1, T + 1, dtype=torch.float32).expand(batch.num_completions, T)
        return TokenOutputs(self.theta * positions * batch.completion_mask_NT)


def row(i, texts, lengths=(3, 3)):
    return {"id": f"r{i}", "question": "q", "answer": "a", "images": [], "texts": list(texts), "lengths": list(lengths)}


def phases(rows, policy=None, prompts_per_step=4, **cfg):
    policy = policy or ScriptedPolicy()
    cfg = GRPOConfig(micro_batch_prompts=1, reward="accuracy", **cfg)
    cfg.validate()
    p = GRPOPhases(cfg, policy, RowStream(rows, seed=0, shuffle=False), seed=0, prompts_per_step=prompts_per_step)
    p.reward_fn = lambda text, answer, **info: float(text == answer)
    return p, policy


def groups_of(micro_batches):
    return [r["id"] for m in micro_batches for r in [m.prompts.rows[g] for g in m.group_ids_N.unique().tolist()]]


SAME, MIXED = ("a", "a"), ("a", "b")


def test_dynamic_sampling_drops_equal_groups_and_refills_then_trims():
    rows = [row(0, SAME), row(1, MIXED), row(2, ("b", "b")), row(3, ("b", "a")), row(4, MIXED), row(5, MIXED)]
    p, policy = phases(rows, prompts_per_step=2, dynamic_sampling=True, dynamic_sampling_max_rounds=5)
    micro, metrics = p.prepare(0, StepTimer())
    # round 1 = r0 (equal) r1 (kept); round 2 = r2 (equal) r3 (kept) -> full, stop; nothing trimmed
    assert policy.sampled == [["r0", "r1"], ["r2", "r3"]]
    assert groups_of(micro) == ["r1", "r3"]
    assert all(bool((m.advantages_N != 0).all()) for m in micro)
    assert metrics["dapo/rounds"] == 2 and metrics["dapo/sampled_groups"] == 4
    assert metrics["dapo/dropped_groups"] == 2 and metrics["dapo/kept_groups"] == 2 and metrics["dapo/short"] == 0
    assert metrics["reward"] == pytest.approx(0.75)  # the first round, unfiltered: (2 + 1) / 4
    # the normaliser counts only the kept tokens: 2 groups x 2 completions x 3 tokens
    assert p.normaliser == 12
    # the next step goes on from r4: r4 and r5 both informative, one round
    micro, metrics = p.prepare(1, StepTimer())
    assert groups_of(micro) == ["r4", "r5"] and metrics["dapo/rounds"] == 1 and metrics["dapo/dropped_groups"] == 0


def test_surplus_of_the_last_round_is_trimmed():
    rows = [row(0, SAME), row(1, SAME), row(2, SAME), row(3, MIXED), row(4, MIXED), row(5, MIXED)]
    p, _ = phases(rows, prompts_per_step=3, dynamic_sampling=True)
    micro, metrics = p.prepare(0, StepTimer())
    # round 1 keeps nothing, round 2 keeps 3 -> exactly 3 groups
    assert groups_of(micro) == ["r3", "r4", "r5"] and metrics["dapo/kept_groups"] == 3
    rows = [row(0, MIXED), row(1, SAME), row(2, MIXED), row(3, MIXED)]
    p, _ = phases(rows, prompts_per_step=2, dynamic_sampling=True)
    micro, metrics = p.prepare(0, StepTimer())
    assert groups_of(micro) == ["r0", "r2"]  # r3 sampled in round 2 but not needed
    assert metrics["dapo/rounds"] == 2 and metrics["dapo/kept_groups"] == 2


def test_the_refill_stops_at_the_cap_and_says_so(caplog):
    rows = [row(i, SAME) for i in range(20)]
    p, policy = phases(rows, prompts_per_step=2, dynamic_sampling=True, dynamic_sampling_max_rounds=3)
    with caplog.at_level(logging.WARNING):
        micro, metrics = p.prepare(0, StepTimer())
    assert len(policy.sampled) == 3  # never more than the cap
    assert metrics["dapo/short"] == 1 and metrics["dapo/kept_groups"] == 0 and metrics["dapo/dropped_groups"] == 6
    assert "kept 0 of 2 groups after 3 rounds" in caplog.text
    assert groups_of(micro) == ["r0", "r1"]  # trains on the first round: all advantages 0
    assert all(bool((m.advantages_N == 0).all()) for m in micro)
    # a short batch with some informative groups trains on those
    rows = [row(0, MIXED)] + [row(i, SAME) for i in range(1, 20)]
    p, _ = phases(rows, prompts_per_step=2, dynamic_sampling=True, dynamic_sampling_max_rounds=2)
    micro, metrics = p.prepare(0, StepTimer())
    assert groups_of(micro) == ["r0"] and metrics["dapo/short"] == 1


def test_without_dynamic_sampling_nothing_is_dropped():
    rows = [row(0, SAME), row(1, MIXED)]
    p, policy = phases(rows, prompts_per_step=2)
    micro, metrics = p.prepare(0, StepTimer())
    assert groups_of(micro) == ["r0", "r1"] and len(policy.sampled) == 1
    assert not any(k.startswith("dapo/") for k in metrics)


def test_overlong_penalty_is_added_to_the_rewards_before_the_advantages():
    # L_max 8, L_cache 4: lengths 3 -> 0, 6 -> -0.5, 8 -> -1 (cut at the limit)
    rows = [row(0, ("a", "a"), lengths=(3, 6)), row(1, ("a", "b"), lengths=(8, 3))]
    p, _ = phases(rows, prompts_per_step=2, overlong_cache=4, advantage="drgrpo")
    micro, metrics = p.prepare(0, StepTimer())
    rewards = torch.cat([m.rewards_N for m in micro]).tolist()
    assert rewards == pytest.approx([1.0, 0.5, 0.0, 0.0])  # [1, 1-0.5, 1-1, 0]
    # Dr.GRPO advantages from the shaped rewards: group 0 mean 0.75, group 1 mean 0
    assert torch.cat([m.advantages_N for m in micro]).tolist() == pytest.approx([0.25, -0.25, 0.0, 0.0])
    assert metrics["reward/overlong"] == pytest.approx(-1.5 / 4)
    # a task-equal group made unequal by length is not dropped by dynamic sampling (the filter
    # looks at the reward the advantages see)
    p, _ = phases(rows, prompts_per_step=2, overlong_cache=4, dynamic_sampling=True)
    micro, metrics = p.prepare(0, StepTimer())
    assert metrics["dapo/kept_groups"] == 2


def test_drgrpo_constant_is_the_rollouts_own_length_limit():
    rows = [row(0, MIXED), row(1, MIXED)]
    p, policy = phases(rows, prompts_per_step=2, aggregation="seq-mean-token-sum-norm")
    micro, _ = p.prepare(0, StepTimer(), max_new_tokens=24)  # a PTST stage's limit
    assert policy.limits == [24] and p.max_tokens == 24
    logprobs = torch.zeros(2, 3, requires_grad=True)
    micro[0].advantages_N = torch.tensor([1.0, 0.0])
    loss, _ = p.loss_from_logprobs(logprobs, micro[0])
    loss.backward()
    # d loss / d logp of a token of completion 0 = -A / (max_tokens x sequences) = -1 / (24 x 4)
    assert logprobs.grad[0, 0].item() == pytest.approx(-1 / (24 * 4))
    p2, _ = phases(rows, prompts_per_step=2, aggregation="seq-mean-token-sum-norm")
    p2.prepare(0, StepTimer())
    assert p2.max_tokens == 8  # no stage: rollout.max_new_tokens


def run_update(p, policy, step, optimizer):
    micro, metrics = p.prepare(step, StepTimer())
    losses = [p.loss(m) for m in micro]
    sum(loss for loss, _ in losses).backward()
    optimizer.step()
    optimizer.zero_grad()
    ratio = [m["ratio_mean"] for _, m in losses]
    return metrics, ratio, [m["ratio_max"] for _, m in losses]


def test_several_updates_per_rollout_make_the_ratio_act_after_the_first():
    rows = [row(i, MIXED, lengths=(2, 5)) for i in range(8)]  # unequal lengths: theta moves
    p, policy = phases(rows, prompts_per_step=2, updates_per_rollout=3, clip_low=0.2, clip_high=0.2)
    opt = torch.optim.SGD([policy.theta], lr=0.5)
    m1, ratio1, max1 = run_update(p, policy, 0, opt)
    assert ratio1 == [1.0, 1.0] and max1 == [1.0, 1.0]  # exactly 1: logp_old is this forward's value
    assert policy.old_passes == 0  # no extra forward pass for logp_old
    m2, ratio2, _ = run_update(p, policy, 1, opt)
    assert len(policy.sampled) == 1 and m2["rollout/reused"] == 1  # the same rollout
    assert all(abs(r - 1) > 1e-3 for r in ratio2)
    m3, _, _ = run_update(p, policy, 2, opt)
    assert m3["rollout/update"] == 2
    run_update(p, policy, 3, opt)  # K = 3 updates done: a new rollout
    assert policy.sampled == [["r0", "r1"], ["r2", "r3"]]


def test_clipping_caps_the_ratio_on_later_updates():
    # one group, advantages +-1: a big step on theta moves the ratio far outside 1 +- 0.2;
    # the clipped tokens have zero gradient, so the clip fraction shows it
    rows = [row(i, MIXED, lengths=(2, 5)) for i in range(4)]
    p, policy = phases(rows, prompts_per_step=1, updates_per_rollout=2)
    opt = torch.optim.SGD([policy.theta], lr=5.0)
    run_update(p, policy, 0, opt)
    micro, _ = p.prepare(1, StepTimer())
    _, metrics = p.loss(micro[0])
    assert metrics["clip_frac"] > 0 and abs(metrics["ratio_mean"] - 1) > 0.2


def test_mini_batches_take_logp_old_before_the_first_update():
    rows = [row(i, MIXED, lengths=(3, 5)) for i in range(8)]
    p, policy = phases(rows, prompts_per_step=1, updates_per_rollout=4, mini_batches=2)
    opt = torch.optim.SGD([policy.theta], lr=0.5)
    theta0 = policy.theta.item()
    m1, ratio1, _ = run_update(p, policy, 0, opt)
    assert policy.sampled == [["r0", "r1"]]  # 2 mini-batches x 1 prompt, sampled at once
    assert policy.old_passes == 1  # mini-batch 1's logp_old, before any update
    assert ratio1 == [1.0]
    micro, metrics = p.prepare(1, StepTimer())
    assert metrics["rollout/mini_batch"] == 1 and groups_of(micro) == ["r1"]
    # its logp_old were taken at theta0 (positions 1..3): theta0 x [1, 2, 3]
    assert micro[0].old_logprobs_NT[0].tolist() == pytest.approx([theta0, 2 * theta0, 3 * theta0, 0, 0])
    _, m = p.loss(micro[0])
    assert abs(m["ratio_mean"] - 1) > 1e-3  # theta moved in update 1, so the ratio is not 1


def test_config_validation():
    with pytest.raises(ValueError, match="must divide"):
        GRPOConfig(updates_per_rollout=3, mini_batches=2).validate()
    with pytest.raises(ValueError):
        GRPOConfig(dynamic_sampling_max_rounds=0).validate()
    with pytest.raises(ValueError):
        GRPOConfig(overlong_cache=-1).validate()


# ---- two processes: the same rounds, the same kept groups as one process ----------------

def _rows_for_ranks():
    # round 1: r0..r3 -> only r1 informative; round 2: r4..r7 all informative -> r1 r4 r5 r6, r7 trimmed
    return [row(0, SAME), row(1, MIXED), row(2, SAME), row(3, ("b", "b")),
            row(4, MIXED), row(5, MIXED), row(6, MIXED), row(7, MIXED)]


def _kept(rank_world=None):
    p, policy = phases(_rows_for_ranks(), prompts_per_step=4, dynamic_sampling=True)
    micro, metrics = p.prepare(0, StepTimer())
    return {"groups": groups_of(micro), "normaliser": p.normaliser, "rounds": len(policy.sampled),
            "kept": metrics["dapo/kept_groups"], "dropped": metrics["dapo/dropped_groups"]}


def _worker(rank, world_size, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(_kept(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 30 s on the shared 2-core machine
def test_two_processes_run_the_same_rounds_and_keep_one_process_groups(tmp_path):
    import torch.multiprocessing as mp

    one = _kept()
    assert one["groups"] == ["r1", "r4", "r5", "r6"] and one["rounds"] == 2 and one["normaliser"] == 24
    out = tmp_path / "out"
    mp.start_processes(_worker, args=(2, 29561, str(out)), nprocs=2, join=True, start_method="spawn")
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    assert parts[0]["groups"] + parts[1]["groups"] == one["groups"]  # rank 0: prompts 0-1, rank 1: 2-3
    for part in parts:  # global decisions and counts
        assert (part["rounds"], part["kept"], part["dropped"], part["normaliser"]) == (2, 4, 3, 24)


def test_the_policy_loss_is_chosen_from_the_registry(monkeypatch):
    from vlreason.algorithms import POLICY_LOSSES

    chosen = []
    for name in ("grpo", "pg"):
        original = POLICY_LOSSES[name]

        def recording(*args, _name=name, _original=original, **kwargs):
            chosen.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setitem(POLICY_LOSSES, name, recording)
    rows = [row(0, MIXED), row(1, MIXED)]
    for name in ("grpo", "pg"):
        p, _ = phases(rows, prompts_per_step=1, policy_loss=name)
        micro, _ = p.prepare(0, StepTimer())
        _, metrics = p.loss(micro[0])
        assert chosen[-1] == name
        # only the clipped surrogate reports clipping; pg has the ratio fixed at 1
        assert ("clip_frac" in metrics) == (name == "grpo")
    with pytest.raises(ValueError, match="algorithm.policy_loss must be one of"):
        GRPOConfig(policy_loss="ppo2").validate()
