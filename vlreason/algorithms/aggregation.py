"""Reduce a per-token loss ``loss_BT`` under a token mask ``mask_BT`` to a scalar.

With ``m`` the mask, ``n_b = sum_t m_bt`` the valid tokens of sequence b, and
``S`` the set of non-empty sequences (``n_b > 0``):

| mode                      | formula                                         | used by          |
|---------------------------|-------------------------------------------------|------------------|
| ``token-mean``            | ``sum_bt m l / sum_bt m``                       | DAPO, Vision-OPD |
| ``seq-mean-token-mean``   | ``mean_{b in S} (sum_t m l / n_b)``             | original GRPO    |
| ``seq-mean-token-sum-norm`` | ``mean_{b in S} (sum_t m l / max_tokens)``    | Dr.GRPO          |

``max_tokens`` is a constant (default: the mask width T); Dr.GRPO uses the generation
limit so that the normaliser does not depend on the completion lengths.

Empty mask rows (padding sequences) are ignored: they add nothing to the numerator and are
not counted in the number of sequences. An all-empty mask gives a loss of exactly 0 (still
connected to the graph, so ``backward()`` works and yields zero gradients).

Gradient accumulation / data parallel
-------------------------------------
Every mode is ``numerator / count`` (:func:`aggregate_sum_and_count`). A mean over
micro-batches of per-micro-batch means is *not* the mean over the full batch when the
micro-batches hold different numbers of tokens (or sequences). To get the full-batch value,
sum the ``count`` of every micro-batch (and all-reduce it across ranks), then pass that sum
as ``global_count``: each micro-batch's ``aggregate(..., global_count=total)`` is
``numerator_i / total`` and these add up (across micro-batches and, with gradient
averaging replaced by summation, across ranks) to the full-batch loss. For
``seq-mean-token-sum-norm`` pass the same explicit ``max_tokens`` to every micro-batch:
the default (the mask width) changes with padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "aggregate_sum_and_count",
    "masked_mean",
]


def _as_weights(loss_BT: Tensor, mask_BT: Tensor) -> Tensor:
    if loss_BT.shape != mask_BT.shape:
        raise ValueError(
            f"loss_BT {tuple(loss_BT.shape)} and mask_BT {tuple(mask_BT.shape)} differ in shape"
        )
    if loss_BT.dim() != 2:
        raise ValueError(f"expected [B, T] tensors, got shape {tuple(loss_BT.shape)}")
    return mask_BT.to(loss_BT.dtype if loss_BT.is_floating_point() else torch.float32)


def _token_mean(
    loss_BT: Tensor, mask_BT: Tensor, *, max_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """(sum_bt m l, sum_bt m)."""
    del max_tokens
    m = _as_weights(loss_BT, mask_BT)
    return (loss_BT * m).sum(), m.sum()


def _seq_mean_token_mean(
    loss_BT: Tensor, mask_BT: Tensor, *, max_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """(sum_{b in S} sum_t m l / n_b, |S|)."""
    del max_tokens
    m = _as_weights(loss_BT, mask_BT)
    n_B = m.sum(dim=-1)
    seq_B = (loss_BT * m).sum(dim=-1) / n_B.clamp(min=1e-8)  # empty rows: 0 / eps = 0
    return seq_B.sum(), (n_B > 0).sum().to(m.dtype)


def _seq_mean_token_sum_norm(
    loss_BT: Tensor, mask_BT: Tensor, *, max_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """(sum_{b in S} sum_t m l / max_tokens, |S|)."""
    m = _as_weights(loss_BT, mask_BT)
    norm = float(loss_BT.shape[-1] if max_tokens is None else max_tokens)
    if norm <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    n_B = m.sum(dim=-1)
    return (loss_BT * m).sum() / norm, (n_B > 0).sum().to(m.dtype)


#: mode -> ``fn(loss_BT, mask_BT, *, max_tokens=None) -> (numerator, count)``.
AGGREGATIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate_sum_and_count(
    loss_BT: Tensor, mask_BT: Tensor, mode: str = "token-mean", *, max_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """Split an aggregation into ``(numerator, count)`` with ``aggregate = numerator / count``.

    ``count`` is the number of valid tokens (``token-mean``) or of non-empty sequences (the
    two ``seq-*`` modes). Sum ``count`` over micro-batches / ranks to build ``global_count``
    for :func:`aggregate`.
    """
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(
            f"unknown aggregation mode {mode!r}; choose one of {list(AGGREGATIONS)}"
        ) from None
    return fn(loss_BT, mask_BT, max_tokens=max_tokens)


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: str = "token-mean",
    *,
    max_tokens: int | None = None,
    global_count: float | Tensor | None = None,
) -> Tensor:
    """Reduce ``loss_BT`` to a scalar (see the module docstring for the modes' formulas).

    Args:
        loss_BT: per-token loss, [B, T].
        mask_BT: 1/True for tokens that count, [B, T] (bool or float weights).
        mode: a key of :data:`AGGREGATIONS`.
        max_tokens: constant normaliser of ``seq-mean-token-sum-norm`` (default T).
        global_count: if given, divide by it instead of this batch's own count (the sum of
            :func:`aggregate_sum_and_count` counts over all micro-batches and ranks).

    Returns:
        0-dim tensor. 0 (not NaN) when there is nothing to average.
    """
    numerator, count = aggregate_sum_and_count(loss_BT, mask_BT, mode, max_tokens=max_tokens)
    if global_count is not None:
        count = torch.as_tensor(global_count, dtype=numerator.dtype, device=numerator.device)
    return numerator / count.clamp(min=1e-8)


def masked_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Token mean of ``x`` over the mask (0 for an empty mask); for metrics."""
    m = mask_BT.to(x_BT.dtype)
    return (x_BT * m).sum() / m.sum().clamp(min=1e-8)
