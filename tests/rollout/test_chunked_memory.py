"""Memory of chunked log-probs vs the plain reference at the real vocabulary size.

How memory is measured (CPU, reliable, no CUDA needed):

1. **Saved for backward.** ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor
   that autograd (including our custom Function's ``save_for_backward``) keeps for
   backward. We add up the bytes of the distinct *storages* among them, and separately
   the bytes of storages that are not the inputs (``hidden``, ``weight``, ``ids`` exist
   anyway, so saving a reference to them costs nothing): that "extra" figure is what the
   method adds to the activation memory between forward and backward.
2. **Peak.** ``torch.profiler.profile(profile_memory=True)`` records one ``[memory]``
   event per allocation (+bytes) and free (-bytes) of PyTorch's CPU allocator, with a
   timestamp. Sorting them by time and taking the maximum running sum gives the peak
   number of bytes allocated *on top of* what existed before the profiled region --
   forward, backward and the returned gradients included. This is exact for tensor
   memory and independent of the OS (unlike RSS, which the glibc allocator and page
   reuse make noisy). As a check that the method sees large temporaries, the reference's
   peak must be at least the ``[M, V]`` float32 logits it necessarily materialises.

Sizes: V = 151,936 (Qwen-VL vocabulary), H = 64, M = 1,024 positions (2,048 in the brief;
halved to keep the test well under 20 s on 2 cores -- the chunked figures do not depend
on M, the reference's grow linearly with it).
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from vlreason.rollout.chunked import gather_logprobs, reference_gather_logprobs
from vlreason.rollout.chunked_entropy import chunked_entropy

V, H, M = 151_936, 64, 1_024
FLOAT = 4  # bytes
MV_BYTES = M * V * FLOAT


def _measure(forward, inputs) -> tuple[int, int, int]:
    """Run ``forward()`` and backward w.r.t. hidden and weight once; return
    ``(saved_total, saved_extra, peak)``: bytes of all distinct storages saved for backward,
    bytes of the non-input ones among them, and the peak bytes allocated by the CPU
    allocator during forward + backward (see module docstring)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    hidden, weight = inputs[0], inputs[1]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        grads = torch.autograd.grad(out.sum(), (hidden, weight))
        del out, grads
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    extra = sum(n for ptr, n in saved.items() if ptr not in input_ptrs)

    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:  # pragma: no cover - depends on the torch version
        pytest.skip("this torch's profiler does not expose kineto_results memory events")
    events = [
        e
        for e in results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return sum(saved.values()), extra, peak


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(M, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.1).requires_grad_()
    ids = torch.randint(0, V, (M,), generator=gen)
    return hidden, weight, ids


def _forward(method, chunk, hidden, weight, ids):
    if method == "reference":
        return reference_gather_logprobs(hidden, weight, ids)
    return gather_logprobs(hidden, weight, ids, chunk_size=chunk)


def test_saved_and_peak_memory(tensors):
    hidden, weight, ids = tensors
    inputs = (hidden, weight, ids)
    grad_weight_bytes = V * H * FLOAT

    measured = {
        key: _measure(lambda key=key: _forward(*key, *inputs), inputs)
        for key in [("reference", 0), ("chunked", 64), ("chunked", 256)]
    }
    saved = {key: m[:2] for key, m in measured.items()}
    peak = {key: m[2] for key, m in measured.items()}

    # the reference keeps the [M, V] float32 log-softmax output alive for backward
    _, ref_extra = saved[("reference", 0)]
    assert ref_extra >= MV_BYTES
    # the measurement sees large temporaries: the reference materialises [M, V] logits
    assert peak[("reference", 0)] >= MV_BYTES

    for chunk in (64, 256):
        total, extra = saved[("chunked", chunk)]
        # only hidden, weight, ids and M log-sum-exp floats; nothing of size V x M
        assert extra <= M * 8 + 1024, (chunk, extra)
        assert extra < 0.05 * ref_extra
        # the rest are the inputs themselves, referenced, not copied
        assert total - extra <= sum(t.untyped_storage().nbytes() for t in inputs)
        # peak: one [chunk, V] float32 buffer + the grad_weight accumulator + small change
        chunk_bytes = chunk * V * FLOAT
        assert chunk_bytes <= peak[("chunked", chunk)], (chunk, peak)
        assert peak[("chunked", chunk)] <= 1.25 * chunk_bytes + 1.1 * grad_weight_bytes, (
            chunk,
            peak,
        )
    assert peak[("chunked", 256)] > peak[("chunked", 64)]
    assert peak[("chunked", 256)] < 0.35 * MV_BYTES
    assert peak[("chunked", 64)] < 0.15 * MV_BYTES
    assert peak[("chunked", 256)] < 0.15 * peak[("reference", 0)]


def test_entropy_with_grad_memory(tensors):
    """Differentiable entropy: two floats per row saved, about two [chunk, V] buffers peak.

    Run on the first 256 positions only (the chunked peak does not depend on M)."""
    hidden, weight, _ = tensors
    rows, chunk = 256, 64
    hidden = hidden[:rows].detach().requires_grad_()

    total, extra, peak = _measure(
        lambda: chunked_entropy(hidden, weight, chunk_size=chunk, with_grad=True),
        (hidden, weight),
    )
    assert extra <= 2 * rows * 4 + 1024
    assert total - extra <= hidden.untyped_storage().nbytes() + weight.untyped_storage().nbytes()
    chunk_bytes = chunk * V * FLOAT
    assert 2 * chunk_bytes <= peak <= 2.25 * chunk_bytes + 1.1 * V * H * FLOAT, peak
