"""PTST schedule (Vision-R1): stage lookup by step, totals, the constant samples x length
check, validation, and the learning-rate multiplier over phases."""

from __future__ import annotations

import pytest
import torch

from vlreason.train.ptst import (
    LRPhase,
    Stage,
    check_constant_budget,
    phase_lr_lambda,
    stage_at,
    stage_ends,
    token_budget,
    total_steps,
    validate_stages,
)

PAPER = [Stage("stage1", 4096, 16, 100), Stage("stage2", 8192, 8, 100), Stage("stage3", 16384, 4, 100)]
UNEVEN = [Stage("a", 24, 8, 3), Stage("b", 48, 4, 1), Stage("c", 96, 2, 2)]


def test_stage_at_walks_the_stages_by_step():
    # a: steps 0-2, b: step 3, c: steps 4-5
    expected = [(0, "a", 0), (0, "a", 1), (0, "a", 2), (1, "b", 0), (2, "c", 0), (2, "c", 1)]
    got = [(i, s.name, k) for i, s, k in (stage_at(UNEVEN, step) for step in range(6))]
    assert got == expected
    assert total_steps(UNEVEN) == 6 and total_steps(PAPER) == 300
    assert stage_ends(UNEVEN) == [3, 4, 6]
    assert stage_ends(UNEVEN, offset=10) == [13, 14, 16]  # e.g. after 10 cold-start steps
    index, stage, in_stage = stage_at(PAPER, 150)
    assert (index, stage.max_new_tokens, stage.num_generations, in_stage) == (1, 8192, 8, 50)


def test_stage_at_rejects_steps_outside_the_schedule():
    with pytest.raises(ValueError, match="past the end"):
        stage_at(UNEVEN, 6)
    with pytest.raises(ValueError, match=">= 0"):
        stage_at(UNEVEN, -1)


def test_constant_budget_holds_for_the_paper_schedule():
    assert [token_budget(s) for s in PAPER] == [65536] * 3
    assert check_constant_budget(PAPER) is True
    assert check_constant_budget(UNEVEN) is True  # 192 everywhere


def test_budget_mismatch_raises_or_warns_within_tolerance():
    drifting = [Stage("s1", 100, 8, 1), Stage("s2", 210, 4, 1)]  # 800 vs 840: +5%
    with pytest.raises(ValueError, match="not constant"):
        check_constant_budget(drifting, 0.0)
    with pytest.warns(UserWarning, match="s2: 210 x 4 = 840"):
        assert check_constant_budget(drifting, 0.0, strict=False) is False
    assert check_constant_budget(drifting, 0.05) is True
    with pytest.raises(ValueError, match="tolerance"):
        check_constant_budget(drifting, -0.1)


@pytest.mark.parametrize("stages, match", [
    ([], "no stages"),
    ([Stage("a", 0, 8, 1)], "max_new_tokens must be a positive integer"),
    ([Stage("a", 8, 0, 1)], "num_generations must be a positive integer"),
    ([Stage("a", 8, 8, -2)], "steps must be a positive integer"),
    ([Stage(" ", 8, 8, 1)], "non-empty name"),
    ([Stage("a", 8, 8, 1), Stage("a", 16, 4, 1)], "unique"),
])
def test_validation_rejects_bad_stages(stages, match):
    with pytest.raises(ValueError, match=match):
        validate_stages(stages)


def test_stages_load_from_yaml_with_strict_keys(tmp_path):
    from dataclasses import dataclass, field

    from vlreason.config import ConfigError, load_config

    @dataclass
    class Holder:
        stages: list[Stage] = field(default_factory=list)

    path = tmp_path / "s.yaml"
    path.write_text("stages:\n  - {name: s1, max_new_tokens: 4096, num_generations: 16, steps: 100}\n")
    assert load_config(Holder, path).stages == [Stage("s1", 4096, 16, 100)]
    path.write_text("stages:\n  - {name: s1, max_new_token: 4096, num_generations: 16, steps: 100}\n")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        load_config(Holder, path)
    path.write_text("stages:\n  - {name: s1, max_new_tokens: 0, num_generations: 16, steps: 100}\n")
    with pytest.raises(ValueError, match="positive"):
        load_config(Holder, path)


def test_phase_lr_restarts_warmup_and_scale_at_each_phase():
    # cold start: steps 0-3 at 10x the base lr, warm-up 2, constant;
    # RL: steps 4-7 at 1x, warm-up 2 restarted at step 4, then cosine over the remaining 2
    phases = (LRPhase(0, 4, lr_scale=10.0, warmup_steps=2, kind="constant"),
              LRPhase(4, 4, warmup_steps=2, kind="cosine", min_lr_ratio=0.0))
    got = [phase_lr_lambda(s, phases) for s in range(9)]
    # 10 * [1/2, 2/2, 1, 1] | [1/2, 2/2, cos(0) -> 1, 0.5 * (1 + cos(pi/2)) = 0.5, end -> 0]
    assert got == pytest.approx([5.0, 10.0, 10.0, 10.0, 0.5, 1.0, 1.0, 0.5, 0.0])


def test_phase_lr_without_a_first_phase_is_the_second():
    phases = (LRPhase(0, 0, lr_scale=10.0), LRPhase(0, 3, warmup_steps=1))  # no cold start
    assert [phase_lr_lambda(s, phases) for s in range(3)] == pytest.approx([1.0, 1.0, 1.0])


def test_phase_lr_as_a_lambdalr_resumes_exactly():
    import functools

    phases = (LRPhase(0, 3, lr_scale=4.0, warmup_steps=2), LRPhase(3, 5, warmup_steps=2, kind="cosine"))
    fn = functools.partial(phase_lr_lambda, phases=phases)

    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, fn)

    opt, sched = make()
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    opt, sched = make()
    for _ in range(4):  # stop inside the second phase, save, restore into fresh objects
        opt.step()
        sched.step()
    state = (opt.state_dict(), sched.state_dict())
    opt, sched = make()
    opt.load_state_dict(state[0])
    sched.load_state_dict(state[1])
    resumed = []
    for _ in range(4):
        resumed.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert resumed == pytest.approx(lrs[4:])
    assert lrs[:3] == pytest.approx([0.2, 0.4, 0.4]) and lrs[3] == pytest.approx(0.05)
