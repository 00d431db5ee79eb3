"""Chunked log-probs / entropy / top-k vs the plain full-vocabulary reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlreason.rollout.chunked import (
    ChunkedGatherLogProbs,
    chunked_logsumexp,
    chunked_topk,
    gather_logprobs,
    reference_gather_logprobs,
)
from vlreason.rollout.chunked_entropy import chunked_entropy

H = 16


def _inputs(M: int, V: int, K: int | None, seed: int, dtype=torch.float32, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(M, H, generator=gen) * scale).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen).to(dtype).requires_grad_()
    shape = (M,) if K is None else (M, K)
    ids = torch.randint(0, V, shape, generator=gen)
    return hidden, weight, ids


def _reference_entropy(hidden, weight):
    logp = torch.log_softmax((hidden @ weight.T).double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _fwd_bwd(fn, hidden, weight, ids, seed):
    out = fn(hidden, weight, ids)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100))
    gh, gw = torch.autograd.grad(out, (hidden, weight), grad_out)
    return out, gh, gw


CASES = list(itertools.product([1, 7, 64], [11, 300], [None, 1, 3], [1, 5, 1000]))


@pytest.mark.parametrize(("M", "V", "K", "chunk"), CASES)
def test_forward_backward_match_reference(M, V, K, chunk):
    for seed in (0, 1):
        hidden, weight, ids = _inputs(M, V, K, seed)
        ref = _fwd_bwd(reference_gather_logprobs, hidden, weight, ids, seed)
        got = _fwd_bwd(
            lambda h, w, i: gather_logprobs(h, w, i, chunk_size=chunk), hidden, weight, ids, seed
        )
        assert got[0].shape == ids.shape and got[0].dtype == torch.float32
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_duplicated_ids_accumulate_gradients():
    hidden, weight, _ = _inputs(6, 13, 3, seed=3)
    ids = torch.tensor([[2, 2, 2], [0, 5, 0], [12, 12, 1], [7, 7, 7], [3, 4, 5], [1, 1, 9]])
    for chunk in (1, 4, 64):
        ref = _fwd_bwd(reference_gather_logprobs, hidden, weight, ids, 3)
        got = _fwd_bwd(
            lambda h, w, i, c=chunk: gather_logprobs(h, w, i, chunk_size=c), hidden, weight, ids, 3
        )
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_hand_worked_value():
    # one position, H=1, W = [0, 1, 2]^T, h = 1: logits [0, 1, 2];
    # lse = log(1 + e + e^2) = 2.40761; log p(2) = 2 - 2.40761 = -0.40761,
    # log p(0) = -2.40761.
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [1.0], [2.0]])
    out = gather_logprobs(hidden, weight, torch.tensor([[2, 0]]), chunk_size=1)
    torch.testing.assert_close(out, torch.tensor([[-0.40761, -2.40761]]), atol=1e-5, rtol=0)
    # entropy: p = [0.0900, 0.2447, 0.6652]; H = -sum p log p = 0.83240
    torch.testing.assert_close(
        chunked_entropy(hidden, weight, chunk_size=1), torch.tensor([0.83240]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("chunk", [1, 2, 10])
def test_gradcheck_double(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (5, 3), generator=gen)
    ids[0, 1] = ids[0, 0]  # a duplicate
    assert torch.autograd.gradcheck(
        lambda h, w: ChunkedGatherLogProbs.apply(h, w, ids, chunk), (hidden, weight)
    )
    # only one input requiring grad
    assert torch.autograd.gradcheck(
        lambda h: ChunkedGatherLogProbs.apply(h, weight.detach(), ids, chunk), (hidden,)
    )


def test_inputs_without_grad_give_none():
    hidden, weight, ids = _inputs(9, 20, 2, seed=4)
    frozen_w = weight.detach()
    out = gather_logprobs(hidden, frozen_w, ids, chunk_size=4)
    (gh,) = torch.autograd.grad(out.sum(), (hidden,))
    ref = reference_gather_logprobs(hidden, frozen_w, ids)
    (gh_ref,) = torch.autograd.grad(ref.sum(), (hidden,))
    torch.testing.assert_close(gh, gh_ref, atol=1e-5, rtol=1e-5)

    captured = {}

    class Spy(ChunkedGatherLogProbs):
        @staticmethod
        def backward(ctx, grad_out):
            grads = ChunkedGatherLogProbs.backward(ctx, grad_out)
            captured["grads"] = grads
            return grads

    out = Spy.apply(hidden.detach(), weight, ids, 4)
    out.sum().backward()
    assert captured["grads"][0] is None and captured["grads"][1] is not None
    assert weight.grad is not None and weight.grad.shape == weight.shape

    out = gather_logprobs(hidden.detach(), frozen_w, ids, chunk_size=4)
    assert not out.requires_grad
    with torch.no_grad():
        assert not gather_logprobs(hidden, weight, ids).requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_hidden(dtype):
    hidden, weight, ids = _inputs(33, 300, 2, seed=5, dtype=dtype, scale=0.3)
    out, gh, gw = _fwd_bwd(
        lambda h, w, i: gather_logprobs(h, w, i, chunk_size=8), hidden, weight, ids, 5
    )
    assert out.dtype == torch.float32
    assert gh.dtype == dtype and gw.dtype == dtype
    ref = _fwd_bwd(reference_gather_logprobs, hidden, weight, ids, 5)
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)  # same logits -> same math
    # gradients: compare with a float64 computation from the same (rounded) inputs
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    _, gh64, gw64 = _fwd_bwd(reference_gather_logprobs, h64, w64, ids, 5)
    torch.testing.assert_close(gh.double(), gh64, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(gw.double(), gw64, atol=3e-2, rtol=3e-2)
    # bf16 hidden with a float32 head (promotion to float32 matmul)
    out_mixed = gather_logprobs(hidden, weight.detach().float(), ids, chunk_size=8)
    ref_mixed = reference_gather_logprobs(hidden, weight.detach().float(), ids)
    torch.testing.assert_close(out_mixed, ref_mixed, atol=1e-5, rtol=1e-5)


def test_batched_shapes():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 5, H, generator=gen, requires_grad=True)
    weight = torch.randn(50, H, generator=gen)
    ids = torch.randint(0, 50, (2, 5), generator=gen)
    out = gather_logprobs(hidden, weight, ids, chunk_size=3)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, reference_gather_logprobs(hidden, weight, ids))
    ids_k = torch.randint(0, 50, (2, 5, 4), generator=gen)
    assert gather_logprobs(hidden, weight, ids_k, chunk_size=3).shape == (2, 5, 4)
    assert chunked_entropy(hidden, weight, 3).shape == (2, 5)
    vals, top_ids = chunked_topk(hidden, weight, 4, 3)
    assert vals.shape == top_ids.shape == (2, 5, 4)
    with pytest.raises(ValueError):
        gather_logprobs(hidden, weight, ids[:1])


def test_chunk_size_larger_than_m_and_one_chunk_equal():
    hidden, weight, ids = _inputs(7, 40, 3, seed=7)
    a = gather_logprobs(hidden, weight, ids, chunk_size=7)
    b = gather_logprobs(hidden, weight, ids, chunk_size=10_000)
    c = gather_logprobs(hidden, weight, ids, chunk_size=1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


def test_empty_m():
    hidden = torch.zeros(0, H, requires_grad=True)
    weight = torch.randn(30, H, requires_grad=True)
    for ids in (torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):
        out = gather_logprobs(hidden, weight, ids, chunk_size=5)
        assert out.shape == ids.shape
        gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
        assert gh.shape == (0, H) and torch.count_nonzero(gw) == 0
    assert chunked_entropy(hidden, weight, 5).shape == (0,)
    for backend in ("function", "checkpoint"):
        ent = chunked_entropy(hidden, weight, 5, with_grad=True, backend=backend)
        assert ent.shape == (0,)
        ent.sum().backward()
    vals, top_ids = chunked_topk(hidden, weight, 3, 5)
    assert vals.shape == top_ids.shape == (0, 3)
    assert chunked_logsumexp(hidden, weight, 5).shape == (0,)


@pytest.mark.parametrize(
    ("M", "V", "k", "chunk"), [(1, 11, 1, 1), (7, 300, 5, 3), (64, 300, 20, 1000)]
)
def test_topk_matches_reference(M, V, k, chunk):
    hidden, weight, _ = _inputs(M, V, None, seed=M + V)
    vals, ids = chunked_topk(hidden, weight, k, chunk_size=chunk)
    assert not vals.requires_grad and ids.dtype == torch.long
    with torch.no_grad():
        ref_vals, ref_ids = torch.log_softmax(hidden @ weight.T, -1).topk(k, dim=-1)
    torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, ref_ids)
    # the student then evaluates its top-k with grad; same values
    student = gather_logprobs(hidden, weight, ids, chunk_size=chunk)
    assert student.requires_grad
    torch.testing.assert_close(student, vals, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        chunked_topk(hidden, weight, V + 1, chunk)


@pytest.mark.parametrize(
    ("M", "V", "chunk"), [(1, 11, 1), (7, 300, 5), (64, 300, 1000), (64, 11, 5)]
)
def test_entropy_and_logsumexp_match_reference(M, V, chunk):
    hidden, weight, _ = _inputs(M, V, None, seed=M * V)
    ref = _reference_entropy(hidden, weight)
    ent = chunked_entropy(hidden, weight, chunk)
    assert not ent.requires_grad and ent.dtype == torch.float32
    torch.testing.assert_close(ent.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        chunked_logsumexp(hidden, weight, chunk), torch.logsumexp(hidden @ weight.T, -1).detach()
    )

    # with grad: matches autograd through the reference entropy, both backends
    grad_out = torch.randn(M, generator=torch.Generator().manual_seed(1))
    ref_f = _reference_entropy(hidden, weight).float()
    gh_r, gw_r = torch.autograd.grad(ref_f, (hidden, weight), grad_out)
    for backend in ("function", "checkpoint"):
        ent_g = chunked_entropy(hidden, weight, chunk, with_grad=True, backend=backend)
        assert ent_g.requires_grad
        gh, gw = torch.autograd.grad(ent_g, (hidden, weight), grad_out)
        torch.testing.assert_close(ent_g, ref_f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, gh_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, gw_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["function", "checkpoint"])
def test_entropy_gradcheck_double(backend):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_entropy(h, w, 2, with_grad=True, backend=backend), (hidden, weight)
    )
    assert torch.autograd.gradcheck(
        lambda h: chunked_entropy(h, weight.detach(), 3, with_grad=True, backend=backend),
        (hidden,),
    )


def test_entropy_low_precision_and_frozen_head():
    hidden, weight, _ = _inputs(20, 300, None, seed=9, dtype=torch.bfloat16, scale=0.3)
    ent = chunked_entropy(hidden, weight.detach(), 6, with_grad=True)
    assert ent.dtype == torch.float32
    (gh,) = torch.autograd.grad(ent.sum(), (hidden,))
    assert gh.dtype == torch.bfloat16
    h64 = hidden.detach().double().requires_grad_()
    ref = _reference_entropy(h64, weight.detach().double())
    (gh64,) = torch.autograd.grad(ref.sum(), (h64,))
    # forward: same bf16 logits, then float math -> close to the float64 softmax of them
    same_logits = _reference_entropy(hidden.detach(), weight.detach())
    torch.testing.assert_close(ent.double(), same_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref.detach(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(gh.double(), gh64, atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError):
        chunked_entropy(hidden, weight, 6, with_grad=True, backend="nope")


def test_input_validation():
    hidden, weight, ids = _inputs(4, 10, 2, seed=8)
    with pytest.raises(ValueError):
        gather_logprobs(hidden, weight, ids, chunk_size=0)
    with pytest.raises(IndexError):
        gather_logprobs(hidden, weight, torch.full((4, 2), 10), chunk_size=2)
    with pytest.raises(IndexError):
        gather_logprobs(hidden, weight, torch.full((4,), -1), chunk_size=2)
    with pytest.raises(TypeError):
        gather_logprobs(hidden, weight, ids.float(), chunk_size=2)
    with pytest.raises(ValueError):
        gather_logprobs(hidden, weight[:, :3], ids, chunk_size=2)
