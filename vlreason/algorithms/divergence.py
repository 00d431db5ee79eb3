"""Token-level divergences between two categorical distributions (distillation, DVRP).

Naming: S = student (the trained policy), T = teacher. All functions reduce over the last
dimension and keep the leading ones: ``[..., V] -> [...]``.

    KL(P || Q)        = sum_v P_v (log P_v - log Q_v)          (0 log 0 = 0)
    forward KL        = KL(T || S)   (mode-covering; what SFT on teacher samples minimises)
    reverse KL        = KL(S || T)   (mode-seeking)
    generalised JSD   M = (1 - a) S + a T
                      JSD_a = (1 - a) KL(S || M) + a KL(T || M)          (0 <= JSD_a <= h(a))

with h(a) the binary entropy in nats (h(0.5) = ln 2).

Endpoints of ``alpha`` (GKD convention, as in TRL's ``generalized_jsd_loss``): taken
literally the formula gives JSD_0 = KL(S || S) = 0 and JSD_1 = KL(T || T) = 0, so the
statement "alpha = 0 gives forward KL(T||S), alpha = 1 reverse KL(S||T)" is not the value
of the formula there. It is the limit of the *rescaled* divergence:
JSD_a / a -> KL(T || S) as a -> 0 and JSD_a / (1 - a) -> KL(S || T) as a -> 1.
:func:`generalized_jsd` therefore returns KL(T || S) for ``alpha == 0`` and KL(S || T) for
``alpha == 1`` explicitly; any 0 < alpha < 1 uses the formula.

Two ways to obtain the distributions:

- full vocabulary, from logits or log-probs ``[..., V]`` (:func:`token_divergence`);
- top-k + tail bucket (Vision-OPD): the student's top-k log-probs and the teacher's
  log-probs at the SAME token ids, each completed with a tail bucket
  ``log(1 - sum_k exp(lp_k))`` to a (K+1)-way distribution (:func:`topk_tail_logprobs`,
  :func:`topk_token_divergence`).

Plus the cheap sampled-token estimate of KL(P || Q) on tokens drawn from P
(:func:`sampled_token_kl`, the k1/k2/k3 estimators of :mod:`vlreason.algorithms.kl`, with a
score-function gradient on the P side so that both arguments get the exact KL's gradient
in expectation; see its docstring and tests/algorithms/test_divergence_gradients.py), and
the two losses built from these: :func:`vision_opd_loss` and :func:`dvrp_regularizer`.

Half-precision inputs are upcast to float32; results are float32 (or float64 for float64
inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from vlreason.algorithms.aggregation import aggregate, masked_mean
from vlreason.algorithms.kl import KL_ESTIMATORS, LOG_RATIO_CLAMP

__all__ = [
    "DIVERGENCES",
    "dvrp_regularizer",
    "forward_kl",
    "generalized_jsd",
    "kl_categorical",
    "kl_from_logits",
    "reverse_kl",
    "sampled_token_kl",
    "topk_tail_logprobs",
    "topk_token_divergence",
    "token_divergence",
    "vision_opd_loss",
]


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kl_categorical(logp_P: Tensor, logq_Q: Tensor) -> Tensor:
    """KL(P || Q) = sum_v P_v (log P_v - log Q_v) from normalised log-probs [..., V].

    Entries with P_v = 0 (log-prob -inf) contribute exactly 0 with finite gradients; an entry
    with P_v > 0 and Q_v = 0 gives +inf, the true value.
    """
    logp, logq = _upcast(logp_P), _upcast(logq_Q)
    zero_p = torch.isneginf(logp)
    logp_f = logp.masked_fill(zero_p, 0.0)
    logq_f = logq.masked_fill(zero_p, 0.0)
    return (torch.exp(logp) * (logp_f - logq_f)).sum(dim=-1)


def forward_kl(student_logprobs_V: Tensor, teacher_logprobs_V: Tensor) -> Tensor:
    """Forward KL(T || S) = sum_v T_v (log T_v - log S_v)."""
    return kl_categorical(teacher_logprobs_V, student_logprobs_V)


def reverse_kl(student_logprobs_V: Tensor, teacher_logprobs_V: Tensor) -> Tensor:
    """Reverse KL(S || T) = sum_v S_v (log S_v - log T_v)."""
    return kl_categorical(student_logprobs_V, teacher_logprobs_V)


def generalized_jsd(
    student_logprobs_V: Tensor, teacher_logprobs_V: Tensor, *, alpha: float = 0.5
) -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD convention at the endpoints).

        M     = (1 - alpha) S + alpha T        (log M by logaddexp, no exp/log round trip)
        JSD_a = (1 - alpha) KL(S || M) + alpha KL(T || M)

    ``alpha == 0`` returns forward KL(T || S), ``alpha == 1`` reverse KL(S || T) (the limits
    of JSD_a / a and JSD_a / (1 - a); the unscaled formula itself is 0 at both ends, see
    the module docstring). alpha = 0.5 is the symmetric JSD, bounded by ln 2.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha == 0.0:
        return forward_kl(student_logprobs_V, teacher_logprobs_V)
    if alpha == 1.0:
        return reverse_kl(student_logprobs_V, teacher_logprobs_V)
    s, t = _upcast(student_logprobs_V), _upcast(teacher_logprobs_V)
    # Entries where S = T = 0 have M = 0 and contribute nothing; give them a finite stand-in
    # so that logaddexp(-inf, -inf) cannot put NaN into the gradient.
    both_zero = torch.isneginf(s) & torch.isneginf(t)
    log_m = torch.logaddexp(
        s.masked_fill(both_zero, 0.0) + math.log1p(-alpha),
        t.masked_fill(both_zero, 0.0) + math.log(alpha),
    )
    return (1.0 - alpha) * kl_categorical(s, log_m) + alpha * kl_categorical(t, log_m)


#: kind -> ``fn(student_logprobs_V, teacher_logprobs_V)``; "jsd" also takes ``alpha=``.
DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
}


def _divergence(kind: str, s: Tensor, t: Tensor, alpha: float) -> Tensor:
    try:
        fn = DIVERGENCES[kind]
    except KeyError:
        raise ValueError(
            f"unknown divergence {kind!r}; choose one of {list(DIVERGENCES)}"
        ) from None
    return fn(s, t, alpha=alpha) if kind == "jsd" else fn(s, t)


def token_divergence(
    student_logits_V: Tensor,
    teacher_logits_V: Tensor,
    kind: str = "jsd",
    *,
    alpha: float = 0.5,
) -> Tensor:
    """Full-vocabulary divergence per position from logits (or log-probs) [..., V] -> [...].

    ``log_softmax`` is applied to both inputs (a no-op for log-probs), in float32 for
    half-precision inputs. ``kind`` is a key of :data:`DIVERGENCES`.
    """
    s = torch.log_softmax(_upcast(student_logits_V), dim=-1)
    t = torch.log_softmax(_upcast(teacher_logits_V), dim=-1)
    return _divergence(kind, s, t, alpha)


def kl_from_logits(p_logits_V: Tensor, q_logits_V: Tensor) -> Tensor:
    """Full-vocabulary KL(P || Q) per position from logits [..., V] (DVRP: P = pi_orig)."""
    return kl_categorical(
        torch.log_softmax(_upcast(p_logits_V), dim=-1),
        torch.log_softmax(_upcast(q_logits_V), dim=-1),
    )


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_tail_logprobs(topk_logprobs_BTK: Tensor, *, min_tail_prob: float = 1e-6) -> Tensor:
    """Append a tail bucket to top-k log-probs: ``[..., K] -> [..., K + 1]``.

        tail = log(1 - sum_k exp(lp_k)) = log1mexp(logsumexp_k(lp_k))

    The top-k mass is clamped to at most ``1 - min_tail_prob`` first, so the tail is finite
    (>= log(min_tail_prob)) even when the top-k cover the whole vocabulary or rounding puts
    their sum above 1. The result sums to 1 up to ``min_tail_prob``.
    """
    lp = _upcast(topk_logprobs_BTK)
    lse = torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=math.log1p(-min_tail_prob))
    return torch.cat([lp, _log1mexp(lse)], dim=-1)


def topk_token_divergence(
    student_topk_logprobs_BTK: Tensor,
    teacher_logprobs_BTK: Tensor,
    kind: str = "jsd",
    *,
    alpha: float = 0.5,
    min_tail_prob: float = 1e-6,
) -> Tensor:
    """Divergence between (K+1)-way top-k + tail distributions, [..., K] -> [...].

    Args:
        student_topk_logprobs_BTK: the student's log-probs of its own top-k token ids
            (normalised over the full vocabulary, with gradient).
        teacher_logprobs_BTK: the teacher's log-probs at the SAME ids (normalised over the
            full vocabulary).
        kind, alpha: see :data:`DIVERGENCES` / :func:`generalized_jsd`.
    """
    if student_topk_logprobs_BTK.shape != teacher_logprobs_BTK.shape:
        raise ValueError(
            f"student {tuple(student_topk_logprobs_BTK.shape)} and teacher "
            f"{tuple(teacher_logprobs_BTK.shape)} top-k log-probs differ in shape"
        )
    s = topk_tail_logprobs(student_topk_logprobs_BTK, min_tail_prob=min_tail_prob)
    t = topk_tail_logprobs(teacher_logprobs_BTK, min_tail_prob=min_tail_prob)
    return _divergence(kind, s, t, alpha)


def sampled_token_kl(
    logprobs_P_BT: Tensor,
    logprobs_Q_BT: Tensor,
    estimator: str = "k3",
    *,
    clamp: float = LOG_RATIO_CLAMP,
    detach_p: bool = False,
) -> Tensor:
    """Per-token estimate of KL(P || Q) on tokens sampled from P, with honest gradients.

    Value: ``KL_ESTIMATORS[estimator](log P(y_t), log Q(y_t))``; k3 = r - log r - 1 with
    r = Q(y)/P(y). k1 and k3 are unbiased for KL(P || Q) when y ~ P (DVRP: rollouts from
    the original image, P = pi_orig); k2 = (log r)^2 / 2 is biased.

    Gradient on the Q side: the estimator's own (pathwise) gradient. Its expectation over
    y ~ P is exactly grad_Q KL(P || Q) for k1 and k3 (E_P[(r - 1) grad log Q] =
    -sum_v P_v grad log Q_v); for k2 it is -E_P[log(P/Q) grad log Q], not the KL's.

    Gradient on the P side (``detach_p=False``): ``stopgrad(log P(y) - log Q(y)) grad log
    P(y)`` (log-ratio clamped like the value), the score-function form of the exact
    gradient grad_P KL(P || Q) = E_P[log(P/Q) grad log P], for every estimator. The
    estimator's own pathwise gradient is NOT used there: for k3 it is E_P[(1 - r) grad
    log P] = -sum_v Q_v grad log P_v = grad_P KL(Q || P), the gradient of the *other* KL
    (per token a push of (r - 1) on log P, unbounded in r); for k1 it is 0 in
    expectation. For k3 the term used equals k3's pathwise gradient plus the missing
    score-function term stopgrad(k3) grad log P (since k3 + 1 - r = -log r); for k2 it
    equals k2's pathwise gradient. ``detach_p=True``: no gradient to P at all (P as a
    fixed target).

    The value is unchanged by either choice. The P-side "exact" is per position: the
    prefix is treated as given, as in the full-vocabulary per-token KL.
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; choose one of {list(KL_ESTIMATORS)}"
        ) from None
    lp = logprobs_P_BT.detach()
    value = fn(lp, logprobs_Q_BT, clamp=clamp)
    if detach_p or not logprobs_P_BT.requires_grad:
        return value
    log_ratio = torch.clamp(lp - logprobs_Q_BT.detach(), min=-clamp, max=clamp)
    # zero-valued surrogate whose gradient w.r.t. log P(y) is the log-ratio
    score = log_ratio * (logprobs_P_BT - lp)
    return value + score.to(value.dtype)


def vision_opd_loss(
    student_topk_logprobs_BTK: Tensor,
    teacher_logprobs_BTK: Tensor,
    mask_BT: Tensor,
    *,
    logprobs_BT: Tensor | None = None,
    old_logprobs_BT: Tensor | None = None,
    kind: str = "jsd",
    alpha: float = 0.5,
    ratio_cap: float = 2.0,
    min_tail_prob: float = 1e-6,
    agg_mode: str = "token-mean",
    max_tokens: int | None = None,
    global_count: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Vision-OPD loss: importance-weighted top-k + tail divergence to a crop teacher.

        w_t = stopgrad(min(exp(logp_t - logp_old_t), ratio_cap))     (1 if either is None)
        L   = aggregate(w_t * D(pS_t^{K+1}, pT_t^{K+1}), mask, agg_mode)   (paper: token-mean)

    with D = JSD_0.5 by default. The teacher side is detached (the teacher is an EMA or
    frozen copy). No reward, advantage or reference KL.

    Metrics: ``divergence_mean``, ``divergence_sum`` and ``tokens`` (the masked sum and
    count, so that several micro-batches give an exact token mean), ``weight_mean``,
    ``weight_max`` (at most ``ratio_cap``),
    ``student_tail_mass``, ``teacher_tail_mass`` (token means of the tail-bucket probabilities: how much mass the
    top-k misses).
    """
    div_BT = topk_token_divergence(
        student_topk_logprobs_BTK,
        teacher_logprobs_BTK.detach(),
        kind,
        alpha=alpha,
        min_tail_prob=min_tail_prob,
    )
    if logprobs_BT is None or old_logprobs_BT is None:
        weight_BT = torch.ones_like(div_BT)
    else:
        log_ratio = torch.clamp(
            logprobs_BT.detach() - old_logprobs_BT.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
        )
        weight_BT = torch.exp(log_ratio).clamp(max=ratio_cap).to(div_BT.dtype)
    loss = aggregate(
        weight_BT * div_BT, mask_BT, agg_mode, max_tokens=max_tokens, global_count=global_count
    )
    with torch.no_grad():
        s_tail = 1.0 - torch.exp(_upcast(student_topk_logprobs_BTK.detach())).sum(-1)
        t_tail = 1.0 - torch.exp(_upcast(teacher_logprobs_BTK.detach())).sum(-1)
        valid = mask_BT.to(div_BT.device).bool()
        metrics = {
            "divergence_mean": masked_mean(div_BT.detach(), mask_BT),
            "divergence_sum": div_BT.detach()[valid].sum(),  # with "tokens": exact means over micro-batches
            "tokens": valid.sum(),
            "weight_mean": masked_mean(weight_BT, mask_BT),
            "weight_max": weight_BT[valid].max() if bool(valid.any()) else weight_BT.new_ones(()),
            "student_tail_mass": masked_mean(s_tail, mask_BT),
            "teacher_tail_mass": masked_mean(t_tail, mask_BT),
        }
    return loss, metrics


def dvrp_regularizer(
    kl_mask_BT: Tensor,
    kl_noise_BT: Tensor,
    entropy_mask_BT: Tensor,
    entropy_noise_BT: Tensor,
    mask_BT: Tensor,
    *,
    lambda_nec: float = 0.01,
    lambda_rob: float = 0.01,
    lambda_ent: float = 0.05,
    agg_mode: str = "token-mean",
    max_tokens: int | None = None,
    global_count: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DVRP visual terms, as a loss to ADD to the GRPO/DAPO loss.

    The paper maximises J = J_GRPO + l_nec KL(pi_orig || pi_mask) - l_rob KL(pi_orig || pi_noise)
    - l_ent [H(pi_mask) + H(pi_noise)], so the per-token loss (= -J without J_GRPO) is

        l_t = -l_nec KL_mask_t + l_rob KL_noise_t + l_ent (H_mask_t + H_noise_t)

    Inputs are per-token values on the rollout tokens: full-vocabulary
    :func:`kl_from_logits` (P = original-image logits; DVRP's default, exact value and
    gradient on both sides) and :func:`~vlreason.algorithms.entropy.entropy_from_logits`,
    or the cheap :func:`sampled_token_kl` (unbiased value for k1/k3; its gradient on both
    sides equals the exact KL's in expectation for k1/k3, see there). Metrics: the token
    means of the four inputs.
    """
    loss_BT = (
        -lambda_nec * kl_mask_BT
        + lambda_rob * kl_noise_BT
        + lambda_ent * (entropy_mask_BT + entropy_noise_BT)
    )
    loss = aggregate(loss_BT, mask_BT, agg_mode, max_tokens=max_tokens, global_count=global_count)
    with torch.no_grad():
        metrics = {
            "kl_mask": masked_mean(kl_mask_BT.detach(), mask_BT),
            "kl_noise": masked_mean(kl_noise_BT.detach(), mask_BT),
            "entropy_mask": masked_mean(entropy_mask_BT.detach(), mask_BT),
            "entropy_noise": masked_mean(entropy_noise_BT.detach(), mask_BT),
        }
    return loss, metrics
