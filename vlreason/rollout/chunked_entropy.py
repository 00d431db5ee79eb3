"""Memory-bounded per-position entropy of ``softmax(hidden @ W.T)``.

Same conventions, dtype rules and chunking as :mod:`vlreason.rollout.chunked` (see its
docstring for the memory table): at most two ``[chunk, V]`` float buffers exist at a time,
in forward and in backward, and backward recomputes each chunk's logits through
:func:`vlreason.rollout.chunk_loop.chunked_backward`. Used for entropy metrics (no grad)
and for DVRP's differentiable entropy terms.
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
    math_dtype_of,
    matmul_dtype_of,
    weight_for_matmul,
)

__all__ = ["ChunkedEntropy", "chunked_entropy"]


def _entropy_of_chunk(h_CH: Tensor, w_VH: Tensor, math_dtype: torch.dtype) -> Tensor:
    """``H = lse - sum_v softmax_v * z_v`` for one chunk with plain (differentiable) ops."""
    logits_CV = chunk_logits(h_CH, w_VH, math_dtype)
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    probs_CV = torch.softmax(logits_CV, dim=-1)
    return lse_C - (probs_CV * logits_CV).sum(dim=-1)


def _entropy_and_lse_(logits_CV: Tensor) -> tuple[Tensor, Tensor]:
    """Row entropy and log-sum-exp of ``logits_CV`` (overwritten), one extra [C, V] buffer.

    With ``m`` the row max, ``e = exp(z - m)``, ``s = sum e``: ``lse = m + log s`` and
    ``H = log s - sum e (z - m) / s`` (shifted logits avoid cancellation).
    """
    max_C = logits_CV.amax(dim=-1)
    shift_C = torch.where(torch.isfinite(max_C), max_C, torch.zeros_like(max_C))
    shifted_CV = logits_CV.sub_(shift_C[:, None])
    e_CV = shifted_CV.exp()
    sum_C = e_CV.sum(dim=-1)
    # e * (z - m) with 0 * -inf := 0 (tokens of zero probability contribute nothing)
    weighted_C = e_CV.mul_(shifted_CV).nan_to_num_(nan=0.0).sum(dim=-1)
    log_sum_C = sum_C.log()
    return log_sum_C - weighted_C / sum_C, log_sum_C + shift_C


class ChunkedEntropy(torch.autograd.Function):
    """``entropy_M[m] = -sum_v p_mv log p_mv`` with ``p = softmax(hidden_MH @ weight_VH.T)``.

    Same chunking and memory behaviour as :class:`ChunkedGatherLogProbs`: forward keeps
    for backward only ``hidden``, ``weight`` (references) and two floats per row (the
    log-sum-exp and the entropy); at most two ``[C, V]`` buffers exist at a time, in
    forward and in backward. Backward recomputes each chunk's logits and uses
    ``dH/dz_v = -p_v (log p_v + H)``, so ``grad_logits = -g p (log p + H)``.

    Args (``apply`` is positional): ``hidden_MH [M, H]``, ``weight_VH [V, H]``,
    ``chunk_size``. Returns ``[M]`` float32 (float64 for float64 input). Not twice
    differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, hidden_MH: Tensor, weight_VH: Tensor, chunk_size: int
    ) -> Tensor:
        check_inputs(hidden_MH, weight_VH, chunk_size)
        math_dtype = math_dtype_of(hidden_MH, weight_VH)
        w_VH = weight_for_matmul(hidden_MH, weight_VH)
        M = hidden_MH.shape[0]
        entropy_M = torch.empty(M, dtype=math_dtype, device=hidden_MH.device)
        lse_M = torch.empty(M, dtype=math_dtype, device=hidden_MH.device)
        for start in range(0, M, chunk_size):
            stop = min(start + chunk_size, M)
            logits_CV = chunk_logits(hidden_MH[start:stop], w_VH, math_dtype)
            entropy_M[start:stop], lse_M[start:stop] = _entropy_and_lse_(logits_CV)
            del logits_CV
        ctx.save_for_backward(hidden_MH, weight_VH, lse_M, entropy_M)
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        return entropy_M

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out_M: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None]:
        hidden_MH, weight_VH, lse_M, entropy_M = ctx.saved_tensors  # type: ignore[attr-defined]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        if not (need_hidden or need_weight):
            return None, None, None
        grad_out_M = grad_out_M.to(lse_M.dtype)

        def grad_logits(start: int, stop: int, logits_CV: Tensor) -> Tensor:
            logp_CV = logits_CV.sub_(lse_M[start:stop, None])
            p_CV = logp_CV.exp()
            logp_CV.add_(entropy_M[start:stop, None]).mul_(p_CV)
            del p_CV
            # 0 * -inf := 0 for tokens of zero probability
            logp_CV.nan_to_num_(nan=0.0)
            return logp_CV.mul_(-grad_out_M[start:stop, None])

        grad_hidden_MH, grad_weight_VH = chunked_backward(
            hidden_MH,
            weight_VH,
            lse_M.dtype,
            ctx.chunk_size,  # type: ignore[attr-defined]
            need_hidden,
            need_weight,
            grad_logits,
        )
        return grad_hidden_MH, grad_weight_VH, None


def chunked_entropy(
    hidden_MH: Tensor,
    weight_VH: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_grad: bool = False,
    *,
    backend: str = "function",
) -> Tensor:
    """Entropy ``H_m = -sum_v p_mv log p_mv`` of ``p = softmax(hidden @ W.T)`` per position.

    Args:
        hidden_MH: ``[M, H]`` (or ``[*, H]``) hidden states.
        weight_VH: ``[V, H]`` LM-head weight.
        chunk_size: positions per chunk.
        with_grad: ``False``: every chunk runs under ``torch.no_grad`` (metrics); the
            result is detached; peak extra memory two ``[chunk, V]`` float32 buffers.
            ``True`` (and grad enabled, and an input requires grad): differentiable
            w.r.t. ``hidden`` and ``weight`` (DVRP's entropy terms), via ``backend``.
        backend: how the differentiable path keeps memory bounded.

            - ``"function"`` (default): :class:`ChunkedEntropy`, a hand-written backward.
              Saves two floats per row besides references to the inputs; at most two
              ``[chunk, V]`` buffers (+ the float32 ``grad_weight`` accumulator) at a
              time in forward and backward.
            - ``"checkpoint"``: plain ops per chunk, each chunk wrapped in
              ``torch.utils.checkpoint`` (non-reentrant), which keeps only the chunk's
              inputs (a view of ``hidden`` and ``weight``) for backward. In backward a
              chunk's logits are recomputed, its graph (logits, softmax, products and
              their gradients: about five ``[chunk, V]`` float32 tensors, measured) is
              run and freed before the next chunk's recompute -- the autograd engine
              finishes the most recently built chunk's graph first -- so the peak does
              not grow with M, but it is ~2.5x that of ``"function"`` and, measured on
              CPU (``benchmarks/logprob_memory.py --entropy``), several times slower.
              Kept as an independent cross-check.

    Returns:
        ``[M]`` (or ``[*]``) entropies in float32 (float64 for float64 input), in nats.
    """
    if backend not in ("function", "checkpoint"):
        raise ValueError(f"backend must be 'function' or 'checkpoint', got {backend!r}")
    lead = hidden_MH.shape[:-1]
    hidden_MH = hidden_MH.reshape(-1, hidden_MH.shape[-1])
    check_inputs(hidden_MH, weight_VH, chunk_size)
    math_dtype = math_dtype_of(hidden_MH, weight_VH)
    M = hidden_MH.shape[0]
    differentiable = (
        with_grad
        and torch.is_grad_enabled()
        and (hidden_MH.requires_grad or weight_VH.requires_grad)
    )
    if not differentiable:
        with torch.no_grad():
            return ChunkedEntropy.apply(hidden_MH, weight_VH, chunk_size).reshape(lead)
    if backend == "function":
        return ChunkedEntropy.apply(hidden_MH, weight_VH, chunk_size).reshape(lead)

    if M == 0:
        # keep the result connected to the graph so that backward() works
        return (hidden_MH.sum(-1) * 0).to(math_dtype) + (weight_VH.sum() * 0).to(math_dtype)
    # The dtype cast of the weight (if any) happens inside the checkpointed function so
    # that no cast copy is saved for backward.
    mm_dtype = matmul_dtype_of(hidden_MH, weight_VH)

    def one_chunk(h_CH: Tensor, w_VH: Tensor) -> Tensor:
        return _entropy_of_chunk(h_CH, w_VH.to(mm_dtype), math_dtype)

    pieces = [
        checkpoint(one_chunk, hidden_MH[start : start + chunk_size], weight_VH, use_reentrant=False)
        for start in range(0, M, chunk_size)
    ]
    return torch.cat(pieces).reshape(lead)
