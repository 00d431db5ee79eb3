"""Memory-bounded per-token log-probs and top-k from last hidden states.

A VLM's language head maps a hidden state ``h`` (size H) to logits ``z = h @ W.T`` over a
vocabulary of V = 151,936 tokens. For M completion positions the full logits are an
``[M, V]`` float32 tensor: 8,192 positions already take 5 GB, and plain autograd keeps
that tensor *and* the log-softmax output alive until backward. Everything here walks over
the M positions in chunks of ``chunk_size`` rows instead, so at most one ``[chunk, V]``
block of logits (plus one or two same-sized temporaries) exists at any time, in forward
and in backward.

Conventions (shapes are in names):

- ``hidden_MH``: last hidden states of the M positions whose next token is scored
  (already flattened over batch and time, already *shifted*: row m predicts token m).
  Any float dtype; may require grad. A leading batch shape ``[*, H]`` is accepted by the
  convenience wrappers.
- ``weight_VH``: the LM head (``lm_head.weight``), no bias; may require grad. For a
  sampling temperature ``tau`` pass ``hidden_MH / tau`` (``(h / tau) @ W.T == z / tau``).
- Logits are computed with one matmul in the inputs' dtype (bf16 on GPU stays on the
  tensor cores) and *then* upcast: all softmax / log-sum-exp math is float32 (float64
  when an input is float64). Returned log-probs / entropies are in that float dtype.

Public API
----------
:class:`ChunkedGatherLogProbs`
    autograd Function: ``log_softmax(h @ W.T)[m, ids[m, k]]``. Saves for backward only
    ``hidden``, ``weight``, ``ids`` and the per-row log-sum-exp (M floats) -- tensors that
    already exist (inputs) plus ``4 M`` bytes -- and recomputes each chunk's logits in
    backward.
:func:`gather_logprobs`
    convenience wrapper (1-D ids -> 1-D output, ``[*, K]`` ids -> ``[*, K]`` output).
:func:`reference_gather_logprobs`
    the plain, full-vocabulary reference (for tests and benchmarks only).
:mod:`vlreason.rollout.chunked_entropy` (``ChunkedEntropy``, ``chunked_entropy``)
    per-position entropy of ``softmax(h @ W.T)``, optionally differentiable (same memory
    scheme: saves two floats per row, recomputes logits in backward).
:func:`chunked_topk`
    top-k log-probs and token ids (no grad), e.g. the student's top-k for Vision-OPD; the
    student then calls ``gather_logprobs(..., ids=topk_ids)`` *with* grad and the teacher
    calls it at the same ids without grad.
:func:`chunked_logsumexp`
    per-position log-partition ``logsumexp(h @ W.T)`` (no grad).
:func:`chunked_full_kl`
    exact per-position ``KL(P || Q)`` over the vocabulary for two sets of hidden states.

The chunk loop itself (input checks, dtype rules, one chunk's logits, the in-place
log-sum-exp, the shared backward loop) is :mod:`vlreason.rollout.chunk_loop`.

Memory (float32 inputs, chunk C; measured by tests/rollout/test_chunked_memory.py)
-------------------------------------------------------------------------------------
| quantity                       | reference (plain autograd) | chunked gather    | entropy       |
|--------------------------------|----------------------------|-------------------|---------------|
| saved for backward, non-input  | ``M V 4`` (log-softmax)    | ``M 4`` (lse)     | ``2 M 4``     |
| peak during forward + backward | ``~3 M V 4``               | ``C V 4 + V H 4`` | ``2 C V 4 + V H 4`` |

(``V H 4`` is the float32 ``grad_weight``; absent for a frozen head.) With bf16 / fp16
inputs each chunk also holds its low-precision logits (``C V 2``) next to the float32
ones, and the ``grad_weight`` accumulation needs a ``[V, H]`` low-precision temporary per
chunk. Mixed dtypes are promoted: bf16 hidden states with a float32 head upcast each
(small) hidden chunk; a bf16 head with float32 hidden states is upcast once per call and
per backward (a ``V H 4`` copy).

When ``weight`` requires grad, backward accumulates ``grad_weight`` in float32 (``V H 4``
bytes, e.g. 2.2 GB for Qwen2.5-VL-7B's head) for precision and casts it to the weight's
dtype at the end; with a frozen head (LoRA, frozen embeddings) no such buffer exists. The
compute cost is one extra ``[C, H] x [H, V]`` matmul per chunk (the logits recompute),
i.e. 4 instead of 3 head-sized matmuls for forward + backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.utils.checkpoint import checkpoint

from vlreason.rollout.chunk_loop import (
    DEFAULT_CHUNK_SIZE,
    check_inputs,
    chunk_logits,
    chunked_backward,
    logsumexp_,
    math_dtype_of,
    matmul_dtype_of,
    weight_for_matmul,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChunkedGatherLogProbs",
    "chunked_full_kl",
    "chunked_logsumexp",
    "chunked_topk",
    "gather_logprobs",
    "reference_gather_logprobs",
]


# --------------------------------------------------------------------------------------
# gathered log-probs (differentiable)
# --------------------------------------------------------------------------------------


class ChunkedGatherLogProbs(torch.autograd.Function):
    """``logprobs_MK[m, k] = log_softmax(hidden_MH @ weight_VH.T)[m, ids_MK[m, k]]``.

    Forward, per chunk of ``chunk_size`` rows: ``logits = (h_chunk @ W.T).float()``,
    gather the ``K`` requested logits, then the row log-sum-exp (computed in place in the
    logits buffer), ``logprob = logit - lse``.

    Saved for backward: ``hidden``, ``weight``, ``ids`` (the caller's own tensors, no
    copies) and ``lse_M`` (M floats). Nothing of size V x M is kept.

    Backward, per chunk: recompute ``logits``; with ``g = grad_out`` (``[C, K]``)
    ``grad_logits = scatter_add(0, ids, g) - softmax(logits) * g.sum(-1, keepdim=True)``
    (computed in place in the logits buffer; duplicate ids add up); then
    ``grad_hidden[chunk] = grad_logits @ W`` and ``grad_weight += grad_logits.T @ h``.
    ``grad_weight`` is accumulated in float32 (float64 for float64 inputs) and cast to the
    weight's dtype at the end. Gradients are returned only for inputs that need them.

    Args (``apply`` is positional):
        hidden_MH: ``[M, H]`` float tensor (fp32 / bf16 / fp16 / fp64).
        weight_VH: ``[V, H]`` float tensor.
        ids_MK: ``[M, K]`` integer token ids in ``[0, V)``, ``K >= 1``.
        chunk_size: rows per chunk (``>= 1``; larger than M means one chunk).

    Returns:
        ``[M, K]`` log-probs in float32 (float64 if an input is float64).

    Not twice differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        hidden_MH: Tensor,
        weight_VH: Tensor,
        ids_MK: Tensor,
        chunk_size: int,
    ) -> Tensor:
        check_inputs(hidden_MH, weight_VH, chunk_size)
        M, V = hidden_MH.shape[0], weight_VH.shape[0]
        if ids_MK.dim() != 2 or ids_MK.shape[0] != M:
            raise ValueError(f"ids_MK must be [M={M}, K], got shape {tuple(ids_MK.shape)}")
        if ids_MK.dtype.is_floating_point or ids_MK.dtype == torch.bool:
            raise TypeError(f"ids_MK must be an integer tensor, got {ids_MK.dtype}")
        ids_MK = ids_MK.to(device=hidden_MH.device, dtype=torch.long)
        if ids_MK.numel() > 0 and (int(ids_MK.min()) < 0 or int(ids_MK.max()) >= V):
            raise IndexError(f"ids_MK out of range [0, {V})")

        math_dtype = math_dtype_of(hidden_MH, weight_VH)
        w_VH = weight_for_matmul(hidden_MH, weight_VH)
        out_MK = torch.empty(ids_MK.shape, dtype=math_dtype, device=hidden_MH.device)
        lse_M = torch.empty(M, dtype=math_dtype, device=hidden_MH.device)
        for start in range(0, M, chunk_size):
            stop = min(start + chunk_size, M)
            logits_CV = chunk_logits(hidden_MH[start:stop], w_VH, math_dtype)
            picked_CK = logits_CV.gather(1, ids_MK[start:stop])
            lse_C = logsumexp_(logits_CV)  # overwrites logits_CV
            del logits_CV
            lse_M[start:stop] = lse_C
            out_MK[start:stop] = picked_CK - lse_C[:, None]

        ctx.save_for_backward(hidden_MH, weight_VH, ids_MK, lse_M)
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        return out_MK

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out_MK: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden_MH, weight_VH, ids_MK, lse_M = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        if not (need_hidden or need_weight):
            return None, None, None, None

        grad_out_MK = grad_out_MK.to(lse_M.dtype)

        def grad_logits(start: int, stop: int, logits_CV: Tensor) -> Tensor:
            # onehot(ids) . g - softmax * sum_k g, built in the logits buffer
            g_CK = grad_out_MK[start:stop]
            logits_CV.sub_(lse_M[start:stop, None]).exp_()
            logits_CV.mul_(-g_CK.sum(dim=-1, keepdim=True))
            return logits_CV.scatter_add_(1, ids_MK[start:stop], g_CK)

        grad_hidden_MH, grad_weight_VH = chunked_backward(
            hidden_MH, weight_VH, lse_M.dtype, chunk_size, need_hidden, need_weight, grad_logits
        )
        return grad_hidden_MH, grad_weight_VH, None, None


def _flatten_for_gather(hidden: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, torch.Size]:
    """``hidden [*, H]`` with ``ids [*]`` or ``[*, K]`` -> ``([M, H], [M, K], ids.shape)``."""
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [H]")
    lead = hidden.shape[:-1]
    if ids.dim() == hidden.dim() - 1:
        ids_MK = ids.reshape(-1, 1)
        if ids.shape != lead:
            raise ValueError(f"ids {tuple(ids.shape)} do not match hidden {tuple(hidden.shape)}")
    elif ids.dim() == hidden.dim():
        if ids.shape[:-1] != lead:
            raise ValueError(f"ids {tuple(ids.shape)} do not match hidden {tuple(hidden.shape)}")
        ids_MK = ids.reshape(-1, ids.shape[-1])
    else:
        raise ValueError(
            f"ids must have shape hidden.shape[:-1] or hidden.shape[:-1] + (K,), got "
            f"ids {tuple(ids.shape)} for hidden {tuple(hidden.shape)}"
        )
    return hidden.reshape(-1, hidden.shape[-1]), ids_MK, ids.shape


def gather_logprobs(
    hidden_MH: Tensor,
    weight_VH: Tensor,
    ids_M_or_MK: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Log-probs of the given token ids, chunked over positions (see module docstring).

    Args:
        hidden_MH: ``[M, H]`` (or ``[*, H]``) last hidden states; may require grad.
        weight_VH: ``[V, H]`` LM-head weight; may require grad.
        ids_M_or_MK: ``[M]`` (one id per position, e.g. the sampled token) or ``[M, K]``
            (K ids per position, e.g. the student's top-k); generally ``[*]`` / ``[*, K]``.
        chunk_size: positions per chunk; peak extra memory is about ``chunk_size * V * 4``
            bytes (x1.5 for bf16 inputs).

    Returns:
        log-probs with the shape of ``ids_M_or_MK``, float32 (float64 for float64 input),
        differentiable w.r.t. ``hidden_MH`` and ``weight_VH``.
    """
    hidden_MH2, ids_MK, out_shape = _flatten_for_gather(hidden_MH, ids_M_or_MK)
    out_MK = ChunkedGatherLogProbs.apply(hidden_MH2, weight_VH, ids_MK, chunk_size)
    return out_MK.reshape(out_shape)


def reference_gather_logprobs(hidden_MH: Tensor, weight_VH: Tensor, ids_M_or_MK: Tensor) -> Tensor:
    """Plain ``log_softmax(hidden @ W.T).gather(ids)``: materialises ``[M, V]`` logits.

    The slow / memory-hungry reference for tests and benchmarks. Same dtype rules as
    :func:`gather_logprobs` (matmul in the input dtype, softmax in float32 / float64).
    """
    hidden_MH2, ids_MK, out_shape = _flatten_for_gather(hidden_MH, ids_M_or_MK)
    math_dtype = math_dtype_of(hidden_MH2, weight_VH)
    mm_dtype = matmul_dtype_of(hidden_MH2, weight_VH)
    logits_MV = (hidden_MH2.to(mm_dtype) @ weight_VH.to(mm_dtype).T).to(math_dtype)
    logprobs_MV = torch.log_softmax(logits_MV, dim=-1)
    return logprobs_MV.gather(1, ids_MK.long()).reshape(out_shape)


# --------------------------------------------------------------------------------------
# top-k, log-sum-exp, full KL
# --------------------------------------------------------------------------------------


@torch.no_grad()
def chunked_topk(
    hidden_MH: Tensor,
    weight_VH: Tensor,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` log-probs and their token ids per position, without grad.

    For Vision-OPD: take the student's top-k ids here, then evaluate both student (with
    grad) and teacher (without) at those ids with :func:`gather_logprobs`.

    Args:
        hidden_MH: ``[M, H]`` (or ``[*, H]``) hidden states.
        weight_VH: ``[V, H]`` LM-head weight.
        k: ``1 <= k <= V``.
        chunk_size: positions per chunk.

    Returns:
        ``(topk_logprobs_MK, topk_ids_MK)``: float32 (float64 for float64 input) log-probs
        sorted in descending order, and ``long`` ids; shapes ``[M, k]`` (or ``[*, k]``).
    """
    lead = hidden_MH.shape[:-1]
    hidden_MH = hidden_MH.reshape(-1, hidden_MH.shape[-1])
    check_inputs(hidden_MH, weight_VH, chunk_size)
    V = weight_VH.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, V={V}], got {k!r}")
    math_dtype = math_dtype_of(hidden_MH, weight_VH)
    w_VH = weight_for_matmul(hidden_MH, weight_VH)
    M = hidden_MH.shape[0]
    values_MK = torch.empty(M, k, dtype=math_dtype, device=hidden_MH.device)
    ids_MK = torch.empty(M, k, dtype=torch.long, device=hidden_MH.device)
    for start in range(0, M, chunk_size):
        stop = min(start + chunk_size, M)
        logits_CV = chunk_logits(hidden_MH[start:stop], w_VH, math_dtype)
        top_CK, ids_MK[start:stop] = logits_CV.topk(k, dim=-1)
        values_MK[start:stop] = top_CK - logsumexp_(logits_CV)[:, None]
        del logits_CV
    return values_MK.reshape(*lead, k), ids_MK.reshape(*lead, k)


@torch.no_grad()
def chunked_logsumexp(
    hidden_MH: Tensor,
    weight_VH: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Log-partition ``logsumexp_v (hidden @ W.T)[m, v]`` per position, without grad.

    Returns ``[M]`` (or ``[*]``) float32 (float64 for float64 input). Log-probs of any
    token follow as ``(hidden @ W[ids].T) - lse`` without touching the full vocabulary.
    """
    lead = hidden_MH.shape[:-1]
    hidden_MH = hidden_MH.reshape(-1, hidden_MH.shape[-1])
    check_inputs(hidden_MH, weight_VH, chunk_size)
    math_dtype = math_dtype_of(hidden_MH, weight_VH)
    w_VH = weight_for_matmul(hidden_MH, weight_VH)
    M = hidden_MH.shape[0]
    lse_M = torch.empty(M, dtype=math_dtype, device=hidden_MH.device)
    for start in range(0, M, chunk_size):
        stop = min(start + chunk_size, M)
        lse_M[start:stop] = logsumexp_(chunk_logits(hidden_MH[start:stop], w_VH, math_dtype))
    return lse_M.reshape(lead)


def chunked_full_kl(hidden_p_MH: Tensor, hidden_q_MH: Tensor, weight_VH: Tensor, *,
                    chunk_size: int = 256) -> Tensor:
    """Exact per-position KL(P || Q) over the whole vocabulary, P = softmax(h_p W^T),
    Q = softmax(h_q W^T), ``chunk_size`` positions at a time.

    With gradients each chunk runs under activation checkpointing: backward recomputes
    that chunk's logits, so no ``[M, V]`` tensor is ever kept.
    """
    from vlreason.algorithms.divergence import kl_from_logits

    def one(hp: Tensor, hq: Tensor, w: Tensor) -> Tensor:
        return kl_from_logits(hp @ w.T, hq @ w.T)

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_p_MH, hidden_q_MH, weight_VH))
    parts = []
    for start in range(0, hidden_p_MH.shape[0], chunk_size):
        hp, hq = hidden_p_MH[start:start + chunk_size], hidden_q_MH[start:start + chunk_size]
        parts.append(checkpoint(one, hp, hq, weight_VH, use_reentrant=False) if needs_grad else one(hp, hq, weight_VH))
    return torch.cat(parts) if parts else hidden_p_MH.new_zeros(0, dtype=torch.float32)
