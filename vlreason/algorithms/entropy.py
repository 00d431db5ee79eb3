"""Token entropy of a categorical distribution given by logits or log-probs.

    H(p) = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v

The second form needs one softmax and no [.., V] log-prob tensor. ``-inf`` logits (masked
vocabulary entries) contribute 0, with finite gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy_from_logits", "entropy_from_logprobs"]


def _entropy(logits_V: Tensor) -> Tensor:
    z = logits_V.float() if logits_V.dtype in (torch.float16, torch.bfloat16) else logits_V
    p = torch.softmax(z, dim=-1)
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)
    return torch.logsumexp(z, dim=-1) - (p * z_finite).sum(dim=-1)


def entropy_from_logits(logits_V: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy over the last dimension: ``logits [..., V] -> entropy [...]``.

    Half-precision inputs are computed in float32 and the result is float32.

    Args:
        logits_V: unnormalised logits (normalised log-probs work too), [..., V].
        chunk_size: if set, process at most this many rows (positions) at a time, which
            bounds the float32 temporaries (softmax, upcast) to ``chunk_size x V`` instead of
            ``B x T x V``. Under autograd each chunk's saved tensors still add up; to bound
            training memory call this per chunk inside ``torch.utils.checkpoint``.
    """
    if chunk_size is None or logits_V.dim() == 1 or logits_V.numel() == 0:
        return _entropy(logits_V)
    lead = logits_V.shape[:-1]
    rows = logits_V.reshape(-1, logits_V.shape[-1])
    out = torch.cat([_entropy(chunk) for chunk in rows.split(chunk_size, dim=0)], dim=0)
    return out.reshape(lead)


def entropy_from_logprobs(logprobs_V: Tensor) -> Tensor:
    """``-sum_v exp(lp_v) lp_v`` over the last dimension for normalised log-probs [..., V]."""
    lp = logprobs_V.float() if logprobs_V.dtype in (torch.float16, torch.bfloat16) else logprobs_V
    lp_finite = lp.masked_fill(torch.isneginf(lp), 0.0)
    return -(torch.exp(lp) * lp_finite).sum(dim=-1)
