"""Memory and time of per-token log-probs: full-vocabulary reference vs chunked.

Runs ``reference_gather_logprobs`` and ``gather_logprobs`` (chunk sizes 128 / 512 / 2048
by default) forward + backward (grads w.r.t. hidden states and LM-head weight) at the
real Qwen-VL vocabulary size V = 151,936 and prints, per method:

- saved: bytes kept for backward beyond the inputs themselves (distinct storages seen by
  ``torch.autograd.graph.saved_tensors_hooks``, minus hidden / weight / ids);
- peak: peak bytes allocated on top of what existed before, during forward + backward
  (running sum of the CPU allocator's ``[memory]`` events of
  ``torch.profiler.profile(profile_memory=True)``);
- time: best wall-clock of ``--repeats`` forward + backward runs (outside the profiler),
  and its ratio to the reference measured in the same run (compare ratios, not absolute
  times: see DESIGN.md, performance rules);
- max|diff|: largest absolute difference of the log-probs from the reference.

Usage::

    python benchmarks/logprob_memory.py [--positions 2048] [--hidden 64]
        [--chunks 128 512 2048] [--repeats 2] [--entropy]

``--entropy`` adds rows for ``chunked_entropy(..., with_grad=True)`` with the
hand-written backward (``entropy(fn)``) and with ``torch.utils.checkpoint``
(``entropy(ckpt)``; its saved bytes are not visible to the outer hooks).
CPU only is fine; on a CUDA machine pass ``--device cuda`` (peak then comes from
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from vlreason.rollout.chunked import gather_logprobs, reference_gather_logprobs
from vlreason.rollout.chunked_entropy import chunked_entropy

VOCAB = 151_936


def saved_extra_bytes(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of distinct non-input storages that autograd saves for backward in ``fn``."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(n for ptr, n in saved.items() if ptr not in input_ptrs)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on top of the starting level while ``fn`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def mb(n: float) -> str:
    """Bytes in MiB, or KiB below 1 MiB (so that small saved figures stay visible)."""
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=2048, help="M, completion positions")
    parser.add_argument("--hidden", type=int, default=64, help="H, hidden size")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="V, vocabulary size")
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--entropy", action="store_true", help="add chunked_entropy rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    M, H, V = args.positions, args.hidden, args.vocab
    gen = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(M, H, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.1).to(device).requires_grad_()
    ids = torch.randint(0, V, (M,), generator=gen).to(device)
    inputs = (hidden, weight, ids)

    print(
        f"device={device} M={M} H={H} V={V} float32; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"[M, V] float32 logits would be {mb(M * V * 4)}; grad_weight is {mb(V * H * 4)}")

    with torch.no_grad():
        ref_out = reference_gather_logprobs(hidden, weight, ids)

    rows: list[tuple[str, str, Callable[[], torch.Tensor], bool]] = [
        ("reference", "-", lambda: reference_gather_logprobs(hidden, weight, ids), True)
    ]
    for c in args.chunks:
        rows.append(
            (
                "chunked",
                str(c),
                lambda c=c: gather_logprobs(hidden, weight, ids, chunk_size=c),
                True,
            )
        )
    if args.entropy:
        for backend, label in (("function", "entropy(fn)"), ("checkpoint", "entropy(ckpt)")):
            for c in args.chunks:
                rows.append(
                    (
                        label,
                        str(c),
                        lambda c=c, b=backend: chunked_entropy(
                            hidden, weight, chunk_size=c, with_grad=True, backend=b
                        ),
                        False,
                    )
                )

    header = f"{'method':<14} {'chunk':>6} {'saved':>14} {'peak':>14} {'time':>9} {'x ref':>6} {'max|diff|':>10}"
    print(header)
    print("-" * len(header))
    ref_time = None
    for name, chunk, fwd, compare in rows:

        def fwd_bwd(fwd=fwd):
            out = fwd()
            return torch.autograd.grad(out.sum(), (hidden, weight))

        saved = saved_extra_bytes(fwd, inputs) if name != "entropy(ckpt)" else None
        peak = peak_bytes(fwd_bwd, device)
        seconds = best_time(fwd_bwd, args.repeats, device)
        ref_time = seconds if ref_time is None else ref_time
        if compare:
            with torch.no_grad():
                diff = f"{(fwd() - ref_out).abs().max().item():.1e}"
        else:
            diff = "-"
        saved_s = mb(saved) if saved is not None else "(ckpt)"
        print(
            f"{name:<14} {chunk:>6} {saved_s:>14} {mb(peak):>14} {seconds:>8.2f}s "
            f"{seconds / ref_time:>6.2f} {diff:>10}"
        )


if __name__ == "__main__":
    main()
