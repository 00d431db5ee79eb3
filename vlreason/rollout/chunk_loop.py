"""The chunk loop shared by every memory-bounded computation over the LM head.

:mod:`vlreason.rollout.chunked` (gathered log-probs, top-k, log-sum-exp, full KL) and
:mod:`vlreason.rollout.chunked_entropy` (entropy) walk over M positions ``chunk_size``
rows at a time; this module holds what they share (conventions and the memory table are
in :mod:`vlreason.rollout.chunked`):

- the input checks (:func:`check_inputs`) and dtype rules: the logits matmul runs in the
  promoted input dtype (:func:`matmul_dtype_of`, :func:`weight_for_matmul`), the softmax
  maths in float32 or float64 (:func:`math_dtype_of`); :func:`chunk_logits` is one
  chunk's logits;
- :func:`logsumexp_`, a row log-sum-exp that overwrites its ``[C, V]`` buffer;
- :func:`chunked_backward`, the backward loop: recompute a chunk's logits, turn them into
  the gradient w.r.t. the logits (the caller's formula), then ``grad_hidden`` and the
  float32 ``grad_weight`` accumulation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 1024


def math_dtype_of(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 / fp16 math is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def matmul_dtype_of(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the logits matmul: the promotion of the two input dtypes."""
    return torch.promote_types(hidden.dtype, weight.dtype)


def check_inputs(hidden_MH: Tensor, weight_VH: Tensor, chunk_size: int) -> None:
    if hidden_MH.dim() != 2:
        raise ValueError(f"hidden_MH must be [M, H], got shape {tuple(hidden_MH.shape)}")
    if weight_VH.dim() != 2:
        raise ValueError(f"weight_VH must be [V, H], got shape {tuple(weight_VH.shape)}")
    if hidden_MH.shape[1] != weight_VH.shape[1]:
        raise ValueError(
            f"hidden size differs: hidden_MH {tuple(hidden_MH.shape)}, "
            f"weight_VH {tuple(weight_VH.shape)}"
        )
    if not (hidden_MH.is_floating_point() and weight_VH.is_floating_point()):
        raise TypeError("hidden_MH and weight_VH must be floating point")
    if hidden_MH.device != weight_VH.device:
        raise ValueError(f"hidden on {hidden_MH.device}, weight on {weight_VH.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def chunk_logits(h_CH: Tensor, w_VH: Tensor, math_dtype: torch.dtype) -> Tensor:
    """``(h @ w.T)`` in the (promoted) input dtype, then upcast to ``math_dtype``.

    ``w_VH`` must already be in the matmul dtype (cast once by the caller, not per chunk).
    """
    return (h_CH.to(w_VH.dtype) @ w_VH.T).to(math_dtype)


def weight_for_matmul(hidden_MH: Tensor, weight_VH: Tensor) -> Tensor:
    """``weight_VH`` in the matmul dtype; a no-op (no copy) when the dtypes already agree."""
    return weight_VH.to(matmul_dtype_of(hidden_MH, weight_VH))


def logsumexp_(logits_CV: Tensor) -> Tensor:
    """Row-wise log-sum-exp that overwrites ``logits_CV`` (no ``[C, V]`` temporary).

    Rows whose maximum is not finite fall back to the max itself (``-inf`` for an all
    ``-inf`` row, ``inf`` / ``nan`` propagate), matching ``torch.logsumexp``.
    """
    max_C = logits_CV.amax(dim=-1)
    shift_C = torch.where(torch.isfinite(max_C), max_C, torch.zeros_like(max_C))
    return logits_CV.sub_(shift_C[:, None]).exp_().sum(dim=-1).log_().add_(shift_C)


def chunked_backward(
    hidden_MH: Tensor,
    weight_VH: Tensor,
    math_dtype: torch.dtype,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    grad_logits: Callable[[int, int, Tensor], Tensor],
) -> tuple[Tensor | None, Tensor | None]:
    """Chunk loop shared by the backward passes.

    For each chunk ``[start, stop)`` the logits are recomputed into a fresh ``[C, V]``
    buffer and handed to ``grad_logits(start, stop, logits_CV)``, which returns the
    gradient w.r.t. those logits (it may, and should, overwrite the buffer). Then
    ``grad_hidden[chunk] = grad_logits @ W`` and ``grad_weight += grad_logits.T @ h``;
    ``grad_weight`` is accumulated in ``math_dtype`` (float32 / float64) and cast to the
    weight's dtype at the end. A gradient that is not needed is ``None`` and not computed.
    """
    M = hidden_MH.shape[0]
    w_VH = weight_for_matmul(hidden_MH, weight_VH)
    mm_dtype = w_VH.dtype
    grad_hidden_MH = torch.empty_like(hidden_MH) if need_hidden else None
    # addmm_ straight into the accumulator when the matmul dtype is the accumulation
    # dtype; else (bf16 / fp16) one [V, H] matmul-dtype temporary per chunk.
    grad_weight_VH = (
        torch.zeros(weight_VH.shape, dtype=math_dtype, device=weight_VH.device)
        if need_weight
        else None
    )
    for start in range(0, M, chunk_size):
        stop = min(start + chunk_size, M)
        h_CH = hidden_MH[start:stop]
        gl_CV = grad_logits(start, stop, chunk_logits(h_CH, w_VH, math_dtype))
        gl_mm_CV = gl_CV if mm_dtype == gl_CV.dtype else gl_CV.to(mm_dtype)
        del gl_CV
        if grad_hidden_MH is not None:
            grad_hidden_MH[start:stop] = (gl_mm_CV @ w_VH).to(hidden_MH.dtype)
        if grad_weight_VH is not None:
            h_mm_CH = h_CH.to(mm_dtype)
            if mm_dtype == math_dtype:
                grad_weight_VH.addmm_(gl_mm_CV.T, h_mm_CH)
            else:
                grad_weight_VH.add_(gl_mm_CV.T @ h_mm_CH)
        del gl_mm_CV
    if grad_weight_VH is not None:
        grad_weight_VH = grad_weight_VH.to(weight_VH.dtype)
    return grad_hidden_MH, grad_weight_VH
