"""Collectives the loop and the recipes share, on the process group's device.

NCCL only reduces CUDA tensors and gloo only CPU ones, so every helper here moves its
values to :func:`collective_device` (the current CUDA device under NCCL, the CPU under
gloo) before the collective and hands back plain Python numbers (or CPU tensors).
With one process every helper is the identity and no process group is needed.

* :func:`world` -- ``(rank, world_size)``;
* :func:`global_sum` / :func:`global_max` -- one number over all processes;
* :func:`reduce_metrics` -- a dict of numeric metrics summed, maxed or averaged;
* :func:`all_agree` -- True only when every process says True (skipped steps);
* :func:`loss_normaliser` -- the step's global token / sequence count divided by the
  number of processes: each process divides its loss by it, and the gradient average
  over processes (DDP's all-reduce, FSDP2's reduce-scatter) then yields the gradient
  of the global-batch loss;
* :func:`hash_seed` -- a sampling seed from (run seed, step, index).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "mean": "SUM"}


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where the default process group reduces tensors: the current CUDA device when
    its backend is NCCL (also inside a mixed ``cpu:gloo,cuda:nccl`` backend string),
    otherwise the CPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "cpu:nccl" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` reduced over processes (sum, max or mean), returned on the CPU."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got '{op}'")
    _, size = world()
    if size == 1:
        return values.detach().cpu().clone()
    work = values.detach().to(collective_device()).clone()
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]))
    if op == "mean":
        work = work / size
    return work.cpu()


def global_sum(value: torch.Tensor | float) -> float:
    """The sum of ``value`` (a number or a tensor, summed whole) over processes."""
    return float(all_reduce(torch.as_tensor(value, dtype=torch.float64).sum().reshape(1), "sum")[0])


def global_max(value: torch.Tensor | float) -> float:
    return float(all_reduce(torch.as_tensor(value, dtype=torch.float64).max().reshape(1), "max")[0])


def reduce_metrics(metrics: dict[str, Any], op: str = "mean") -> dict[str, Any]:
    """Numeric (non-bool) values reduced over processes in one collective; others kept.

    Every process must pass the same numeric keys (the loop's metrics are per step)."""
    if world()[1] == 1:
        return dict(metrics)
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not keys:
        return dict(metrics)
    values = all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64), op)
    return {**metrics, **dict(zip(keys, values.tolist()))}


def all_agree(ok: bool) -> bool:
    """True when ``ok`` is True on every process (one MAX over 'not ok' flags)."""
    flag = all_reduce(torch.tensor([0.0 if ok else 1.0]), "max")
    return bool(flag[0] == 0)


def loss_normaliser(local_count: torch.Tensor | float) -> float:
    """Global count / world size: the divisor of each process's summed loss so that the
    processes' mean gradient is the gradient of the global mean loss."""
    return global_sum(local_count) / world()[1]


def hash_seed(seed: int, step: int, index: int) -> int:
    """A sampling seed for (run seed, step, index), stable across resumes. The GRPO
    phases pass the global prompt index, so a prompt's samples do not depend on how
    many processes share the step; older callers pass the rank."""
    return (seed * 1_000_003 + step * 7_919 + index * 104_729) % (2**31 - 1)
