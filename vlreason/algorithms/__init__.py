"""Pure tensor functions for the training objectives: no config objects, no I/O.

Shapes are in the names (``logprobs_BT``: batch x completion tokens, ``rewards_N``: one per
completion, ``..._V``: last dimension is the vocabulary). Losses return ``(loss, metrics)``;
per-token losses are reduced by :func:`aggregate`. Variants live in plain dicts:
:data:`ADVANTAGES`, :data:`AGGREGATIONS`, :data:`KL_ESTIMATORS`, :data:`POLICY_LOSSES`,
:data:`DIVERGENCES`. :func:`ema_update_` keeps an EMA of weights in fp32. See
``docs/algorithms.md`` for the formula table.
"""

from vlreason.algorithms.advantages import (
    ADVANTAGES,
    drgrpo_advantages,
    group_advantages,
    group_index,
    grpo_advantages,
)
from vlreason.algorithms.aggregation import (
    AGGREGATIONS,
    aggregate,
    aggregate_sum_and_count,
    masked_mean,
)
from vlreason.algorithms.divergence import (
    DIVERGENCES,
    dvrp_regularizer,
    forward_kl,
    generalized_jsd,
    kl_categorical,
    kl_from_logits,
    reverse_kl,
    sampled_token_kl,
    token_divergence,
    topk_tail_logprobs,
    topk_token_divergence,
    vision_opd_loss,
)
from vlreason.algorithms.ema import copy_to_, ema_update_, fp32_shadow
from vlreason.algorithms.entropy import entropy_from_logits, entropy_from_logprobs
from vlreason.algorithms.kl import KL_ESTIMATORS, LOG_RATIO_CLAMP, kl_k1, kl_k2, kl_k3
from vlreason.algorithms.policy_loss import (
    POLICY_LOSSES,
    clipped_surrogate,
    nll_loss,
    pg_loss_BT,
    policy_gradient_loss,
)

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "DIVERGENCES",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "POLICY_LOSSES",
    "aggregate",
    "aggregate_sum_and_count",
    "clipped_surrogate",
    "copy_to_",
    "drgrpo_advantages",
    "dvrp_regularizer",
    "ema_update_",
    "entropy_from_logits",
    "entropy_from_logprobs",
    "forward_kl",
    "fp32_shadow",
    "generalized_jsd",
    "group_advantages",
    "group_index",
    "grpo_advantages",
    "kl_categorical",
    "kl_from_logits",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "nll_loss",
    "pg_loss_BT",
    "policy_gradient_loss",
    "reverse_kl",
    "sampled_token_kl",
    "token_divergence",
    "topk_tail_logprobs",
    "topk_token_divergence",
    "vision_opd_loss",
]
