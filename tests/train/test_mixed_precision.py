"""Mixed precision: with ``model.dtype=bfloat16`` the trainable weights and AdamW state
stay fp32 and only the compute is bf16 (autocast, here on CPU), so 20 GRPO updates at
lr 1e-5 move the weights as far as an fp32 run; bf16 master weights (the old
behaviour: the model cast to bf16 and stepped in place) lose most of those updates to
rounding. The GRPO step is the real one (``GRPOPhases.loss`` through the loop) on one
fixed sampled batch with fixed synthetic rewards, so every arm sees the same data."""

from __future__ import annotations

import pytest
import torch

from vlreason.recipe_base import Recipe
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer

STEPS, LR = 20, 1e-5


class FixedBatchGRPO(Recipe):
    """A loop recipe whose every step is the GRPO loss of the same rollout batch."""

    def __init__(self, policy, phases, batch):
        self.policy, self.model, self.phases, self.batch = policy, policy.model, phases, batch

    def prepare(self, step, timer):
        self.phases.normaliser = float(self.phases._count(self.batch))
        per_prompt = self.policy.rollout.num_generations
        return [self.batch.select(list(range(i, i + per_prompt)))
                for i in range(0, self.batch.num_completions, per_prompt)], {}

    def step(self, micro):
        return self.phases.loss(micro)


@pytest.fixture(scope="module")
def rollout():
    """One batch sampled from the fp32 model, with rewards that give non-zero advantages."""
    policy, phases = _policy("float32")
    rows = [phases.stream.dataset[0]]
    batch = policy.sample(policy.prompts(rows), seed=[1])
    from vlreason.algorithms import grpo_advantages

    batch.rewards_N = torch.rand(batch.num_completions, generator=torch.Generator().manual_seed(3))
    batch.advantages_N = grpo_advantages(batch.rewards_N, policy.rollout.num_generations)
    return batch


def _policy(dtype: str):
    from vlreason.data.schema import load_canonical
    from vlreason.data.stream import RowStream
    from vlreason.models.loading import ModelConfig
    from vlreason.paths import demo_data, warm_model
    from vlreason.rollout.policy import Policy, RolloutConfig
    from vlreason.train.grpo import GRPOConfig, GRPOPhases

    policy = Policy.load(ModelConfig(name_or_path=str(warm_model()), dtype=dtype),
                         RolloutConfig(num_generations=4, max_new_tokens=16))
    stream = RowStream(load_canonical(demo_data("train")), seed=0)
    return policy, GRPOPhases(GRPOConfig(), policy, stream, seed=0, prompts_per_step=4)


def _update_norm(tmp_path, rollout, dtype: str, bf16_masters: bool = False) -> float:
    policy, phases = _policy(dtype)
    if bf16_masters:  # the old behaviour: weights stored in bf16, AdamW updates them in place
        policy.model.to(torch.bfloat16)
    start = {n: p.detach().float().clone() for n, p in policy.model.named_parameters()}
    cfg = LoopConfig(output_dir=str(tmp_path / f"{dtype}-{bf16_masters}"), max_steps=STEPS, trackers=[],
                     progress=False, optim=OptimConfig(lr=LR, max_grad_norm=0.0))
    trainer = Trainer(cfg, FixedBatchGRPO(policy, phases, rollout))
    for _ in range(STEPS):
        trainer.train_step(_NoTimer())
    if not bf16_masters:  # the masters and AdamW's moments are fp32 whatever the compute dtype
        assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
        moments = [v for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0]
        assert moments and {v.dtype for v in moments} == {torch.float32}
    delta = [(p.detach().float() - start[n]).norm() for n, p in policy.model.named_parameters()]
    return float(torch.stack(delta).norm())


class _NoTimer:
    def __call__(self, name):
        import contextlib

        return contextlib.nullcontext()

    def pop(self):
        return {}


def test_bf16_compute_moves_weights_like_fp32_and_bf16_masters_do_not(tmp_path, rollout, capsys):
    fp32 = _update_norm(tmp_path, rollout, "float32")
    bf16 = _update_norm(tmp_path, rollout, "bfloat16")  # compute under torch.autocast("cpu", bfloat16)
    masters = _update_norm(tmp_path, rollout, "float32", bf16_masters=True)
    with capsys.disabled():
        print(f"\nupdate norm after {STEPS} steps at lr {LR}: fp32 {fp32:.3e}, bf16 compute {bf16:.3e} "
              f"(ratio {bf16 / fp32:.3f}), bf16 master weights {masters:.3e} (ratio {masters / fp32:.3f})")
    assert fp32 > 0
    assert 0.8 < bf16 / fp32 < 1.25
    assert masters / fp32 < 0.5
