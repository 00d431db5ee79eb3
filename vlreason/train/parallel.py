"""How the model runs over processes: one process, DDP, or FSDP2 (``parallel.strategy``).

The recipes never call the model's own ``forward``: rollouts, log-probs and the
reference pass go through its internals (``family.core(model)``, the LM head's weight).
Both of torch's engines hook a *module's* forward, so each engine wraps a tiny
:class:`Runner` module around the model whose ``forward(fn)`` just calls ``fn()``; the
loop runs a whole micro-batch step as ``engine.forward(lambda: recipe.step(micro))``
and a whole rollout phase as ``engine.gathered(lambda: recipe.prepare(...))``. The
model's parameters stay where they are (``recipe.model`` is still the plain model),
so every internal call inside ``fn`` is seen by the engine:

* **DDP** (``DistributedDataParallel(Runner(model))``): its reducer hooks every
  parameter's gradient accumulation, and a forward through the wrapper arms it for the
  next backward, so the gradients of any internal call are bucketed and all-reduced by
  DDP itself (no hand-written all-reduce). Gradient accumulation uses ``no_sync`` on all
  but the last micro-batch. ``find_unused_parameters`` is on because a recipe may
  leave parts of the model out of a step (frozen views, text-only rows).
* **FSDP2** (``fully_shard``): every decoder layer and vision block is its own
  parameter group, then the Runner is the root (embeddings, LM head, norms, patch
  embedding, merger). Each group all-gathers on its own forward and reduce-scatters
  its gradients (averaged) in backward; parameters are DTensors sharded over the
  processes, and so are the optimizer states built on them. ``MixedPrecisionPolicy``
  gathers bf16 copies for compute and reduces gradients in fp32 when ``model.dtype``
  asks for bf16; ``CPUOffloadPolicy`` keeps shards (and optimizer state) on the CPU.
  Rollouts decode token by token, so :meth:`FSDP2Engine.gathered` gathers every group
  once for the whole phase (``unshard()`` with resharding after forward turned off)
  and reshards after it, instead of one all-gather per layer per token.

``torch.distributed._composable.replicate`` was not used: it is DDP's reducer behind
the same module-forward hook, so it needs the same Runner, and DDP is the stable API.

Every process must run the same number of forwards per step (FSDP2 all-gathers in
each; DDP syncs once per step): the loop pads a process with fewer micro-batches with
zero-weighted repeats of its last one (:func:`aligned_micro_batches`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vlreason.config import doc
from vlreason.train.distributed import global_max, world

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "none", "ddp", "fsdp2")


@dataclass
class ParallelConfig:
    strategy: str = doc("auto | none | ddp | fsdp2. auto: none with one process, ddp with several; "
                        "fsdp2 shards parameters, gradients and optimizer state over processes.", "auto")
    cpu_offload: bool = doc("fsdp2 only: keep parameter shards, gradients and optimizer state on the CPU "
                            "(CPUOffloadPolicy); slower, for models that do not fit otherwise.", False)
    reshard_after_forward: bool = doc("fsdp2 only: free each layer's gathered parameters after its forward "
                                      "(gather again in backward): less memory, more communication.", True)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy must be one of {list(STRATEGIES)}, got '{self.strategy}'")
        if self.cpu_offload and self.strategy != "fsdp2":
            raise ValueError("parallel.cpu_offload needs parallel.strategy=fsdp2")


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "none" if world_size == 1 else "ddp"
    if strategy != "none" and world_size == 1:
        log.info("parallel.strategy=%s with one process", strategy)
    if strategy == "none" and world_size > 1:
        raise ValueError("parallel.strategy=none with several processes would train diverging copies; "
                         "use auto, ddp or fsdp2")
    return strategy


class Runner(torch.nn.Module):
    """The module an engine wraps: its forward runs a closure over the model's internals."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


class Engine:
    """One process (strategy ``none``): closures run as they are."""

    strategy = "none"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def forward(self, fn: Callable[[], Any], *, sync: bool = True) -> Any:
        """Run ``fn`` (a forward whose loss will be backpropagated); ``sync=False`` on all
        but the last micro-batch of a step defers the gradient reduction."""
        return fn()

    def gathered(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (no-gradient work: rollouts) with the full parameters available."""
        return fn()

    def shard_report(self, optimizer: torch.optim.Optimizer | None = None) -> str:
        """What this process holds of the trainable parameters (and of the optimizer
        state, once it exists), measured from the local shards' sizes."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        text = _fraction("trainable parameters", [_local(p).numel() for p in params], [p.numel() for p in params])
        if optimizer is not None and optimizer.state:
            states = [v for s in optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor) and v.dim() > 0]
            text += "; " + _fraction("optimizer state", [_local(v).numel() for v in states], [v.numel() for v in states])
        return f"rank {world()[0]} ({self.strategy}): {text}"


def _fraction(what: str, local: list[int], total: list[int]) -> str:
    a, b = sum(local), sum(total)
    return f"{what} {a:,} of {b:,} elements ({a / max(b, 1):.1%})"


class DDPEngine(Engine):
    strategy = "ddp"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        self.runner = DistributedDataParallel(Runner(model), device_ids=ids, find_unused_parameters=True,
                                              forward_sync_buffers=False)

    def forward(self, fn: Callable[[], Any], *, sync: bool = True) -> Any:
        with contextlib.nullcontext() if sync else self.runner.no_sync():
            return self.runner(fn)


class FSDP2Engine(Engine):
    strategy = "fsdp2"

    def __init__(self, model: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device, *,
                 compute_dtype: torch.dtype, cpu_offload: bool, reshard_after_forward: bool):
        super().__init__(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        if cpu_offload and device.type != "cuda":
            raise ValueError("parallel.cpu_offload moves shards from the GPU to host memory; this model "
                             f"is on {device.type}, where the shards already are in host memory")
        mesh = init_device_mesh(device.type, (world()[1],))
        low = compute_dtype if compute_dtype != torch.float32 else None
        kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32),
                      offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
        for block in blocks:
            fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
        self.blocks = blocks
        self.reshard_after_forward = reshard_after_forward
        self.runner = Runner(model)
        fully_shard(self.runner, **kwargs)

    def forward(self, fn: Callable[[], Any], *, sync: bool = True) -> Any:
        self.runner.set_requires_gradient_sync(sync)
        return self.runner(fn)

    def gathered(self, fn: Callable[[], Any]) -> Any:
        def run():
            for block in self.blocks:
                block.set_reshard_after_forward(False)
                block.unshard()
            try:
                return fn()
            finally:
                for block in self.blocks:
                    block.reshard()
                    block.set_reshard_after_forward(self.reshard_after_forward)

        return self.runner(run)


def shard_units(family, model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP2's parameter groups below the root: the decoder layers and vision blocks, as
    the model's family adapter names them (Qwen-VL and InternVL lay them out differently)."""
    return [*family.language_layers(model), *family.vision_blocks(model)]


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def build_engine(cfg: ParallelConfig, model: torch.nn.Module, family, *, compute_dtype: torch.dtype) -> Engine:
    """Wrap ``model`` (in place for FSDP2) for ``cfg.strategy``; call before building the optimizer."""
    strategy = resolve_strategy(cfg.strategy, world()[1])
    device = next(model.parameters()).device
    if strategy == "none":
        return Engine(model)
    if strategy == "ddp":
        return DDPEngine(model, device)
    return FSDP2Engine(model, shard_units(family, model), device, compute_dtype=compute_dtype,
                       cpu_offload=cfg.cpu_offload, reshard_after_forward=cfg.reshard_after_forward)


def aligned_micro_batches(micro_batches: list[Any]) -> list[tuple[Any, float]]:
    """(micro-batch, loss weight) pairs, the same count on every process: a process with
    fewer repeats its last micro-batch with weight 0 (its gradient contribution is 0)."""
    if not micro_batches:
        raise RuntimeError("a process has no micro-batch this step")
    count = int(global_max(len(micro_batches)))
    pairs = [(m, 1.0) for m in micro_batches]
    return pairs + [(micro_batches[-1], 0.0)] * (count - len(pairs))


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Total gradient norm over every process's shards (DTensor-aware), clipped to
    ``max_norm`` when it is positive."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters())


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
