"""Per-process memory plan of a training run: weights, gradients, optimizer, reference.

The loop calls :func:`log_memory_plan` once before the first step; it logs a small table
and warns when the plan exceeds the device's memory. :func:`plan_memory` is the pure
formula, on parameter counts only (``benchmarks/memory_plan.py`` runs it on the
published Qwen-VL shapes built on the meta device; docs/scaling.md shows the figures).

Notation, per process: ``T`` trainable elements, ``F`` frozen elements of the trained
model, ``P = T + F``; ``bT``, ``bF`` the bytes per element they are *stored* in (the
trainable model is loaded in fp32: the master weights, so 4 and 4); ``bc`` the bytes of
the compute dtype (2 for bf16); ``W`` processes; ``s = W`` under ``fsdp2`` (everything
it shards is divided by ``W``), else 1; ``R`` the reference model's elements, ``bR``
its bytes (a frozen copy in the compute dtype; 0 with LoRA, whose reference is the base
model with the adapter off); ``n`` the number of trainable tensors; ``B`` the largest
FSDP2 unit (a decoder layer or vision block) and ``Root`` what lies outside the units
(embeddings, LM head, norms, patch embedding, merger).

============  ========================================================================
weights       (T bT + F bF) / s                            masters (+ frozen), sharded
compute copy  none / ddp: bc x (trainable elements stored in another dtype than the
              compute dtype): autocast caches one cast of each such weight for the
              step's forward/backward. fsdp2: bc x P during the rollout (every unit is
              gathered at once for token-by-token decoding), bc x (Root + 2 B) in the
              update (the current unit and the prefetched one; bc x P when
              ``reshard_after_forward`` is off)
gradients     T bT / s                                     same dtype as the weights
ddp buckets   T bT under ddp (DDP's reducer keeps a flat copy of the gradients unless
              ``gradient_as_bucket_view``), else 0
optimizer     AdamW: (2 T bT + 4 n) / s                    exp_avg, exp_avg_sq in the
              weights' dtype (fp32 masters: 8 bytes a parameter), one fp32 step
              counter per tensor
reference     R bR / s                                     sharded under fsdp2 like the
              policy
============  ========================================================================

With ``cpu_offload`` (fsdp2's ``CPUOffloadPolicy``) the weight shards, gradients and
optimizer state live in host memory: they move from the device total to the host
total. The phases do not overlap in time: the rollout holds weights, optimizer state,
reference and the rollout's compute copy (gradients are freed after every step), the
update holds weights, optimizer state, reference, gradients, DDP buckets and the
update's compute copy. ``total`` is the larger of the two.

Not counted (they depend on batch size, sequence length, images and checkpointing, not
on the model): activations, the rollout's KV cache, logits chunks, the CUDA context
(~0.5-1 GiB), allocator fragmentation, and transient buffers (AdamW's foreach temporaries,
FSDP2's bf16 unsharded gradients of one unit, a reference's own gathered units). The
plan is exact for what it counts: tests/train/test_memory.py compares it with the bytes
of every tensor after one AdamW step of the tiny Qwen-VL model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fsdp2")
GIB = 2**30


@dataclass(frozen=True)
class ParamCounts:
    """Element and byte counts of a model's parameters (tied weights counted once)."""

    trainable: int
    frozen: int = 0
    trainable_bytes: int | None = None  # default: 4 bytes an element (fp32 masters)
    frozen_bytes: int | None = None  # default: 4 bytes an element (a trainable model is loaded fp32)
    trainable_tensors: int = 0  # tensors that get an optimizer step counter
    vision: int = 0  # elements in the vision tower (patch embedding, blocks, merger)
    largest_unit: int = 0  # elements of the largest FSDP2 unit (decoder layer / vision block)
    root: int | None = None  # elements outside the units (default: all of them)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def language(self) -> int:
        return self.total - self.vision

    def bytes_of(self, which: str) -> int:
        if which == "trainable":
            return self.trainable_bytes if self.trainable_bytes is not None else 4 * self.trainable
        return self.frozen_bytes if self.frozen_bytes is not None else 4 * self.frozen

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ParamCounts:
        """Counts of ``model`` as it is stored (DTensor shards count as their whole tensor)."""
        tr = fr = tr_b = fr_b = tensors = 0
        for p in model.parameters():
            n = p.numel()
            if p.requires_grad:
                tr, tr_b, tensors = tr + n, tr_b + n * p.element_size(), tensors + 1
            else:
                fr, fr_b = fr + n, fr_b + n * p.element_size()
        # the vision tower by its name in the Qwen-VL ("visual") and InternVL ("vision_tower") layouts
        vision = next((_numel(m) for name, m in model.named_modules()
                       if name.split(".")[-1] in ("visual", "vision_tower")), 0)
        units = [m for name, lst in model.named_modules() if isinstance(lst, torch.nn.ModuleList)
                 and name.split(".")[-1] in ("layers", "blocks", "layer") for m in lst]
        sizes = [_numel(m) for m in units]
        return cls(trainable=tr, frozen=fr, trainable_bytes=tr_b, frozen_bytes=fr_b, trainable_tensors=tensors,
                   vision=vision, largest_unit=max(sizes, default=0), root=tr + fr - sum(sizes))


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class MemoryPlan:
    """Bytes per process. ``device_total`` is what must fit on one accelerator."""

    strategy: str
    world_size: int
    compute_dtype: torch.dtype
    counts: ParamCounts
    weights: int
    compute_rollout: int
    compute_update: int
    gradients: int
    ddp_buckets: int
    optimizer: int
    reference: int
    cpu_offload: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def compute_copy(self) -> int:
        return max(self.compute_rollout, self.compute_update)

    def _on_device(self, nbytes: int) -> int:
        return 0 if self.cpu_offload else nbytes

    @property
    def rollout_total(self) -> int:
        return self._on_device(self.weights + self.optimizer) + self.reference + self.compute_rollout

    @property
    def update_total(self) -> int:
        held = self._on_device(self.weights + self.optimizer + self.gradients)
        return held + self.ddp_buckets + self.reference + self.compute_update

    @property
    def total(self) -> int:
        """Peak device bytes per process over the two phases (what is counted)."""
        return max(self.rollout_total, self.update_total)

    @property
    def host_total(self) -> int:
        """Host bytes per process for the offloaded state (0 without ``cpu_offload``)."""
        return self.weights + self.optimizer + self.gradients if self.cpu_offload else 0

    @property
    def weights_gradients_optimizer(self) -> int:
        return self.weights + self.gradients + self.optimizer


def _dtype(value: torch.dtype | str, device: torch.device | str | None = None) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{value}'")
    return dtype


def resolve_plan_strategy(strategy: str, world_size: int) -> str:
    """``auto`` as the loop resolves it (vlreason.train.parallel): none with one
    process, ddp with several."""
    if strategy == "auto":
        return "none" if world_size == 1 else "ddp"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {['auto', *STRATEGIES]}, got '{strategy}'")
    return strategy


def plan_memory(counts: ParamCounts, *, strategy: str = "none", world_size: int = 1,
                compute_dtype: torch.dtype | str = torch.bfloat16, reference_params: int = 0,
                reference_dtype: torch.dtype | str | None = None, reference_sharded: bool | None = None,
                cpu_offload: bool = False, reshard_after_forward: bool = True) -> MemoryPlan:
    """The per-process plan of the module docstring's formulas (pure: counts in, bytes out).

    ``reference_params``: elements of a separate frozen reference copy (0: none, e.g.
    KL coefficient 0 or LoRA); it is stored in ``reference_dtype`` (default: the compute
    dtype) and sharded when ``reference_sharded`` (default: under fsdp2)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    strategy = resolve_plan_strategy(strategy, world_size)
    if cpu_offload and strategy != "fsdp2":
        raise ValueError("cpu_offload needs strategy fsdp2")
    cdtype = _dtype(compute_dtype)
    bc = torch.empty((), dtype=cdtype).element_size()
    shard = world_size if strategy == "fsdp2" else 1
    t_bytes, f_bytes = counts.bytes_of("trainable"), counts.bytes_of("frozen")
    # per-element storage width of the trainable weights (4 for fp32 masters)
    t_width = t_bytes / counts.trainable if counts.trainable else 4
    if strategy == "fsdp2":
        root = counts.root if counts.root is not None else counts.total
        compute_rollout = bc * counts.total
        compute_update = bc * (root + 2 * counts.largest_unit) if reshard_after_forward else bc * counts.total
    else:  # autocast: one cached cast of each trainable weight stored wider (or narrower) than compute
        compute_rollout = compute_update = 0 if t_width == bc else bc * counts.trainable
    ref_dtype = _dtype(reference_dtype) if reference_dtype is not None else cdtype
    ref_shard = shard if (reference_sharded if reference_sharded is not None else strategy == "fsdp2") else 1
    plan = MemoryPlan(
        strategy=strategy, world_size=world_size, compute_dtype=cdtype, counts=counts,
        weights=_div(t_bytes + f_bytes, shard),
        compute_rollout=int(compute_rollout), compute_update=int(compute_update),
        gradients=_div(t_bytes, shard),
        ddp_buckets=t_bytes if strategy == "ddp" else 0,
        optimizer=_div(2 * t_bytes + 4 * counts.trainable_tensors, shard),
        reference=_div(reference_params * torch.empty((), dtype=ref_dtype).element_size(), ref_shard),
        cpu_offload=cpu_offload,
    )
    if strategy == "fsdp2" and not counts.largest_unit:
        plan.notes.append("no FSDP2 units found: the update's gathered copy counts the whole model as root")
    return plan


def _div(nbytes: int, parts: int) -> int:
    """Bytes of one of ``parts`` shards (rounded up: the first shards hold the remainder)."""
    return -(-int(nbytes) // parts)


def human(n: float, unit: str = "") -> str:
    """``n`` with a K / M / G suffix (powers of 1000): 3.75G, 1.23M, 512."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_plan(plan: MemoryPlan) -> str:
    """A small fixed-width table of the plan, in GiB (MiB for models under 1 GiB a process)."""
    c = plan.counts
    head = (f"memory plan per process: strategy {plan.strategy}, {plan.world_size} process(es), compute "
            f"{str(plan.compute_dtype).replace('torch.', '')}{', cpu offload' if plan.cpu_offload else ''}\n"
            f"parameters {human(c.total)} (vision {human(c.vision)}, language {human(c.language)}), "
            f"trainable {human(c.trainable)}")
    where = "host" if plan.cpu_offload else "device"
    rows = [
        (f"weights (masters + frozen, {where})", plan.weights),
        ("compute copy, rollout", plan.compute_rollout),
        ("compute copy, update", plan.compute_update),
        (f"gradients ({where})", plan.gradients),
        ("DDP buckets", plan.ddp_buckets),
        (f"optimizer, AdamW ({where})", plan.optimizer),
        ("reference model", plan.reference),
        ("device total, rollout", plan.rollout_total),
        ("device total, update", plan.update_total),
        ("device total (peak)", plan.total),
    ]
    if plan.cpu_offload:
        rows.append(("host total (offloaded)", plan.host_total))
    unit, size = ("GiB", GIB) if plan.total >= GIB else ("MiB", 2**20)
    lines = [head, f"{'':<36}{unit:>10}"] + [f"{name:<36}{value / size:>10.2f}" for name, value in rows]
    lines.append("not counted: activations, KV cache, logits chunks, CUDA context, fragmentation")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def device_memory(device: torch.device | str | None = None) -> int | None:
    """Total bytes of ``device``: CUDA from its properties, CPU from /proc/meminfo
    (MemTotal); None where neither is known."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")
        if meminfo.is_file():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    return None


def check_plan(plan: MemoryPlan, available: int | None, *, what: str = "the device") -> bool:
    """Warn (logging.warning) when the plan's device total exceeds ``available`` bytes;
    True when it fits (or nothing is known)."""
    if available is None or plan.total <= available:
        return True
    hints = ["parallel.strategy=fsdp2 (shards weights, gradients, optimizer)" if plan.strategy != "fsdp2"
             else "more processes or parallel.cpu_offload=true", "model.lora.enabled=true"]
    log.warning("memory plan: %.1f GiB per process (before activations) exceeds %s's %.1f GiB; consider %s",
                plan.total / GIB, what, available / GIB, " or ".join(hints))
    return False


def log_memory_plan(model: torch.nn.Module, *, strategy: str, world_size: int,
                    compute_dtype: torch.dtype | str, reference: torch.nn.Module | None = None,
                    cpu_offload: bool = False, device: torch.device | str | None = None,
                    reshard_after_forward: bool = True, available: int | None = None) -> MemoryPlan:
    """Plan ``model``'s memory (+ an optional frozen ``reference`` copy), log the table
    (INFO) and warn if it exceeds ``device``'s memory (``available`` bytes overrides the
    lookup). Call it before the first step, on the model as loaded or as wrapped."""
    counts = ParamCounts.from_model(model)
    ref_params, ref_dtype = 0, None
    if reference is not None:
        params = list(reference.parameters())
        ref_params = sum(p.numel() for p in params)
        ref_dtype = params[0].dtype if params else None
    plan = plan_memory(counts, strategy=strategy, world_size=world_size,
                       compute_dtype=_dtype(compute_dtype, device), reference_params=ref_params,
                       reference_dtype=ref_dtype, cpu_offload=cpu_offload,
                       reshard_after_forward=reshard_after_forward)
    log.info("%s", format_plan(plan))
    if available is None:
        try:
            available = device_memory(device)
        except (RuntimeError, AssertionError, ValueError):  # no such device: nothing to compare
            available = None
    check_plan(plan, available, what=str(device) if device is not None else "the device")
    return plan
