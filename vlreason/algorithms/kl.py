"""Per-token estimators of KL(pi_theta || pi_ref) from sampled-token log-probs.

Tokens are sampled from pi_theta. With ``log_ratio = logp - ref_logp`` (= log pi/pi_ref)
and ``delta = -log_ratio = ref_logp - logp``:

| name | formula                        | properties (Schulman, "Approximating KL divergence") |
|------|--------------------------------|--------------------------------------------------|
| k1   | ``log_ratio``                  | unbiased, high variance, can be negative         |
| k2   | ``0.5 * log_ratio ** 2``       | biased (low for close policies), >= 0            |
| k3   | ``exp(delta) - delta - 1``     | unbiased, low variance, >= 0 (GRPO's estimator)  |

The same estimators give KL(p || q) for any two distributions when the tokens were sampled
from p (pass ``logprobs_BT = log p``, ``ref_logprobs_BT = log q``): DVRP uses k3 this way as
the cheap sampled-token alternative to the full-vocabulary KL.

Gradients: "unbiased" above is about the value. Used as a loss with gradient through
``logprobs_BT`` only (GRPO's reference KL, tokens from pi_theta), the expected gradient
w.r.t. pi_theta is: k1 -> 0; k2 -> grad KL(pi_theta || pi_ref) exactly; k3 -> grad
KL(pi_ref || pi_theta), the other KL (they agree to first order near pi_ref). See
docs/algorithms.md and tests/algorithms/test_divergence_gradients.py; DVRP's
:func:`~vlreason.algorithms.divergence.sampled_token_kl` adds the missing score-function
term for its sampling side.

Numerical safety: the log-ratio is clamped to ``[-clamp, clamp]`` (default 20) before the
estimator is applied, so ``exp`` cannot overflow (exp(20) ~ 4.9e8) and a single token with a
-inf reference log-prob cannot produce inf/NaN. Outside the range the gradient is zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "LOG_RATIO_CLAMP", "kl_k1", "kl_k2", "kl_k3"]

#: Default bound on |logp - ref_logp| before the estimators are applied.
LOG_RATIO_CLAMP = 20.0


def _log_ratio(logprobs_BT: Tensor, ref_logprobs_BT: Tensor, clamp: float) -> Tensor:
    return torch.clamp(logprobs_BT - ref_logprobs_BT, min=-clamp, max=clamp)


def kl_k1(
    logprobs_BT: Tensor, ref_logprobs_BT: Tensor, *, clamp: float = LOG_RATIO_CLAMP
) -> Tensor:
    """k1 = logp - ref_logp (clamped to [-clamp, clamp])."""
    return _log_ratio(logprobs_BT, ref_logprobs_BT, clamp)


def kl_k2(
    logprobs_BT: Tensor, ref_logprobs_BT: Tensor, *, clamp: float = LOG_RATIO_CLAMP
) -> Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2."""
    return 0.5 * _log_ratio(logprobs_BT, ref_logprobs_BT, clamp).square()


def kl_k3(
    logprobs_BT: Tensor, ref_logprobs_BT: Tensor, *, clamp: float = LOG_RATIO_CLAMP
) -> Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1  (>= 0).

    Example: logp = log 1 = 0, ref_logp = log 0.5 -> 0.5 + 0.6931 - 1 = 0.1931.
    """
    delta = -_log_ratio(logprobs_BT, ref_logprobs_BT, clamp)
    return torch.expm1(delta) - delta


KL_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}
