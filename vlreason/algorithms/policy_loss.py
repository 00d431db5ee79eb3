"""Policy losses: PPO/GRPO clipped surrogate, plain off-policy policy gradient, NLL.

Every loss has a per-token part (``*_BT`` functions, no reduction) and a wrapper that
reduces it with :func:`~vlreason.algorithms.aggregation.aggregate` and returns
``(loss, metrics)``. Metrics are detached 0-dim tensors (token means over the mask), so that
logging them costs no device synchronisation until the caller asks for ``.item()``.

The losses in :data:`POLICY_LOSSES` share the call
``fn(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, *, agg_mode, max_tokens,
global_count, **loss_specific_keywords)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vlreason.algorithms.aggregation import aggregate, masked_mean
from vlreason.algorithms.kl import LOG_RATIO_CLAMP

__all__ = [
    "POLICY_LOSSES",
    "clipped_surrogate",
    "nll_loss",
    "pg_loss_BT",
    "policy_gradient_loss",
]


def _advantages_BT(advantages_B: Tensor, like_BT: Tensor) -> Tensor:
    """Broadcast per-sequence [B] (or already per-token [B, T]) advantages to [B, T]."""
    if advantages_B.dim() == 1:
        advantages_B = advantages_B.unsqueeze(-1)
    return advantages_B.to(like_BT.dtype).expand_as(like_BT)


def pg_loss_BT(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor | None,
    advantages_B: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token clipped surrogate loss (PPO / GRPO / DAPO clip-higher).

        rho_t = exp(logp_t - logp_old_t)
        l_t   = -min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A)
              =  max(-rho_t A, -clip(rho_t, ...) A)

    A token counts as clipped when the clipped term is the active (strictly larger) one,
    i.e. its gradient is zero: rho > 1 + clip_high with A > 0, or rho < 1 - clip_low with
    A < 0.

    Args:
        logprobs_BT: log pi_theta of the sampled tokens (with gradient), [B, T].
        old_logprobs_BT: log pi_old of the same tokens, [B, T]; ``None`` means one update per
            rollout (pi_old = pi_theta): the ratio is ``exp(logp - logp.detach())``, equal to
            1 but with gradient d rho / d logp = 1, so no extra forward pass is needed.
        advantages_B: [B] (one per sequence) or [B, T].
        clip_low, clip_high: eps_low / eps_high (DAPO clip-higher: 0.2 / 0.28).

    Returns:
        ``(loss_BT, ratio_BT, clipped_BT)``; ``clipped_BT`` is a bool tensor. The log-ratio
        is clamped to +-20 before ``exp``.
    """
    old = logprobs_BT.detach() if old_logprobs_BT is None else old_logprobs_BT
    log_ratio_BT = torch.clamp(logprobs_BT - old, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = _advantages_BT(advantages_B, logprobs_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_term_BT = -adv_BT * torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_term_BT)
    return loss_BT, ratio_BT, clipped_term_BT > unclipped_BT


def clipped_surrogate(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor | None,
    advantages_B: Tensor,
    mask_BT: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg_mode: str = "token-mean",
    max_tokens: int | None = None,
    global_count: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO / PPO clipped surrogate: ``aggregate(pg_loss_BT(...), mask_BT, agg_mode)``.

    Metrics (token means over the mask):
        ``clip_frac`` fraction of tokens whose gradient is clipped (= ``clip_frac_low`` +
        ``clip_frac_high``; high: rho > 1 + clip_high with A > 0, low: rho < 1 - clip_low with
        A < 0), ``ratio_mean``, ``ratio_max`` (over masked tokens; 0 if none), ``approx_kl``
        (k3-style ``mean(rho - 1 - log rho)`` estimate of KL(pi_old || pi_theta)).
    """
    loss_BT, ratio_BT, clipped_BT = pg_loss_BT(
        logprobs_BT, old_logprobs_BT, advantages_B, clip_low=clip_low, clip_high=clip_high
    )
    loss = aggregate(loss_BT, mask_BT, agg_mode, max_tokens=max_tokens, global_count=global_count)
    with torch.no_grad():
        ratio = ratio_BT.detach()
        adv_BT = _advantages_BT(advantages_B.detach(), ratio)
        clipped = clipped_BT.to(ratio.dtype)
        high = clipped * (adv_BT > 0).to(ratio.dtype)
        valid = mask_BT.bool()
        metrics = {
            "clip_frac": masked_mean(clipped, mask_BT),
            "clip_frac_high": masked_mean(high, mask_BT),
            "clip_frac_low": masked_mean(clipped - high, mask_BT),
            "ratio_mean": masked_mean(ratio, mask_BT),
            # (where/max rather than boolean indexing: no host-device synchronisation)
            "ratio_max": torch.where(valid, ratio, torch.zeros_like(ratio)).max(),
            "approx_kl": masked_mean(ratio - 1.0 - torch.log(ratio), mask_BT),
        }
    return loss, metrics


def policy_gradient_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor | None,
    advantages_B: Tensor,
    mask_BT: Tensor,
    *,
    agg_mode: str = "token-mean",
    max_tokens: int | None = None,
    global_count: float | Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Off-policy policy gradient with the importance ratio fixed at 1 (SOPHIA).

        l_t = -A * logp_t

    No ratio, no clipping, no KL. ``old_logprobs_BT``, ``clip_low`` and ``clip_high`` are
    accepted for a uniform :data:`POLICY_LOSSES` interface and ignored (the behaviour
    policy's probabilities are deliberately dropped, as in the paper). With A = 1 on reward-filtered samples this is the
    supervised NLL. Metrics: ``logprob_mean``, ``advantage_mean`` (token means).
    """
    del old_logprobs_BT, clip_low, clip_high
    adv_BT = _advantages_BT(advantages_B, logprobs_BT)
    loss_BT = -adv_BT * logprobs_BT
    loss = aggregate(loss_BT, mask_BT, agg_mode, max_tokens=max_tokens, global_count=global_count)
    with torch.no_grad():
        metrics = {
            "logprob_mean": masked_mean(logprobs_BT.detach(), mask_BT),
            "advantage_mean": masked_mean(adv_BT.detach(), mask_BT),
        }
    return loss, metrics


def nll_loss(
    logprobs_BT: Tensor,
    mask_BT: Tensor,
    *,
    agg_mode: str = "token-mean",
    max_tokens: int | None = None,
    global_count: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Supervised negative log-likelihood: ``aggregate(-logp_BT, mask_BT, agg_mode)``.

    Metrics: ``nll`` (token mean, detached; ``exp(nll)`` is the perplexity).
    """
    loss = aggregate(
        -logprobs_BT, mask_BT, agg_mode, max_tokens=max_tokens, global_count=global_count
    )
    with torch.no_grad():
        metrics = {"nll": masked_mean(-logprobs_BT.detach(), mask_BT)}
    return loss, metrics


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "grpo": clipped_surrogate,
    "pg": policy_gradient_loss,
}
