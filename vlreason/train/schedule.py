"""Optimizer and learning-rate schedule.

    optimizer = build_optimizer(model.named_parameters(), lr=1e-6, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, warmup_steps=10, total_steps=500, kind="cosine")
    for step in range(total_steps):
        ...; optimizer.step(); scheduler.step()

Step ``s`` (0-based, counted in optimizer steps) runs at ``lr * lr_lambda(s, ...)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import nn

SCHEDULES = ("cosine", "constant")
NO_DECAY_NAME_PARTS = ("bias", "norm")


def lr_lambda(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    kind: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up is linear: steps ``0 .. warmup_steps-1`` run at ``(step+1)/warmup_steps``, so
    the first step uses ``lr / warmup_steps`` and the last warm-up step the full ``lr``.
    After warm-up, ``"constant"`` stays at 1 and ``"cosine"`` decays from 1 at
    ``warmup_steps`` to ``min_lr_ratio`` at ``total_steps`` (and stays there after).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError("warmup_steps and total_steps must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    kind: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_lambda`; call ``scheduler.step()`` after each
    optimizer step. Its ``state_dict()`` round-trips through :mod:`.checkpoint`."""
    lr_lambda(
        0, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, min_lr_ratio=min_lr_ratio
    )  # validate the arguments now, not at step 0
    fn = functools.partial(
        lr_lambda,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        kind=kind,
        min_lr_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, normalisation weights (by name) and every 1-D tensor get no weight decay."""
    lowered = name.lower()
    return param.ndim <= 1 or any(part in lowered for part in NO_DECAY_NAME_PARTS)


def build_optimizer(
    params_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]] | Iterable[torch.Tensor],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable (``requires_grad``) parameters in two groups.

    ``params_or_named_params`` is a module, ``module.named_parameters()`` or plain
    parameters (then only the 1-D rule applies). Group ``"decay"`` gets
    ``weight_decay``; group ``"no_decay"`` (see :func:`is_no_decay`) gets 0. Empty groups
    are left out; each group carries its ``"name"``.
    """
    if isinstance(params_or_named_params, nn.Module):
        items: list = list(params_or_named_params.named_parameters())
    else:
        items = list(params_or_named_params)
    named = [
        item if isinstance(item, tuple) else (f"param_{i}", item) for i, item in enumerate(items)
    ]
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    seen: set[int] = set()
    for name, param in named:
        if not param.requires_grad or id(param) in seen:  # skip frozen and tied duplicates
            continue
        seen.add(id(param))
        (no_decay if is_no_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: no trainable parameters (all have requires_grad=False)")
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )
