"""Learning-rate schedule and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlreason.train.schedule import build_optimizer, build_scheduler, lr_lambda


def _lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def test_warmup_is_linear_from_lr_over_warmup_to_lr():
    opt = _opt(lr=0.4)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=20, kind="constant")
    # steps 0..3 run at lr * (s+1)/4: 0.1, 0.2, 0.3, 0.4; then constant 0.4
    assert _lrs(sched, opt, 6) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_cosine_reaches_min_at_total_and_stays():
    kw = dict(warmup_steps=2, total_steps=12, kind="cosine", min_lr_ratio=0.1)
    assert lr_lambda(2, **kw) == pytest.approx(1.0)  # end of warm-up: full lr
    # halfway through decay (step 7 of 2..12): 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert lr_lambda(7, **kw) == pytest.approx(0.55)
    assert lr_lambda(12, **kw) == pytest.approx(0.1)
    assert lr_lambda(50, **kw) == pytest.approx(0.1)
    values = [lr_lambda(s, **kw) for s in range(2, 13)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing


def test_cosine_without_warmup_and_constant_stays():
    assert lr_lambda(0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)
    assert lr_lambda(10, warmup_steps=0, total_steps=10) == pytest.approx(0.0)
    assert lr_lambda(5, warmup_steps=0, total_steps=10) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 2))
    )
    assert all(
        lr_lambda(s, warmup_steps=0, total_steps=10, kind="constant") == 1.0 for s in range(30)
    )


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler(_opt(), warmup_steps=0, total_steps=10, kind="linear-ish")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_lambda(0, warmup_steps=0, total_steps=10, min_lr_ratio=2.0)


def test_scheduler_state_roundtrip():
    opt = _opt()
    sched = build_scheduler(opt, warmup_steps=3, total_steps=10)
    _lrs(sched, opt, 5)
    opt2 = _opt()
    sched2 = build_scheduler(opt2, warmup_steps=3, total_steps=10)
    sched2.load_state_dict(sched.state_dict())
    assert _lrs(sched2, opt2, 5) == pytest.approx(_lrs(sched, opt, 5))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)  # weight: decay, bias: no decay
        self.input_layernorm = nn.LayerNorm(4)  # both no decay (name and 1-D)
        self.scale = nn.Parameter(torch.ones(4))  # 1-D: no decay
        self.norm_2d = nn.Parameter(torch.ones(2, 2))  # "norm" in the name: no decay
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_split_by_name_and_ndim():
    model = _Block()
    opt = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    groups = {g["name"]: g for g in opt.param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["decay"] == {id(model.proj.weight)}
    assert ids["no_decay"] == {
        id(model.proj.bias),
        id(model.input_layernorm.weight),
        id(model.input_layernorm.bias),
        id(model.scale),
        id(model.norm_2d),
    }
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["betas"] == (0.9, 0.95) and groups["decay"]["lr"] == 1e-3
    assert isinstance(opt, torch.optim.AdamW)


def test_optimizer_accepts_module_plain_params_and_skips_tied_duplicates():
    model = _Block()
    from_module = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert sum(len(g["params"]) for g in from_module.param_groups) == 6
    plain = build_optimizer([model.proj.weight, model.proj.bias], lr=1e-3, weight_decay=0.1)
    assert [len(g["params"]) for g in plain.param_groups] == [1, 1]
    only_1d = build_optimizer([("a", model.scale), ("b", model.scale)], lr=1.0, weight_decay=0.1)
    assert [g["name"] for g in only_1d.param_groups] == ["no_decay"]  # empty group left out
    assert len(only_1d.param_groups[0]["params"]) == 1
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model.frozen.named_parameters(), lr=1.0, weight_decay=0.0)
