"""Vision-OPD's quantities besides the loss: pure functions on tensors.

The loss is :func:`vlreason.algorithms.divergence.vision_opd_loss`. What the recipe
(``recipes/vision_opd.py``) also needs, and now only wires:

* **The loss with its diagnostics** (:func:`opd_loss_and_sums`): one call of
  :func:`~vlreason.algorithms.divergence.vision_opd_loss` on the update's own forward
  gives the loss and, from the same per-token divergence (computed once), its masked
  token sum; whether student and teacher agree (:func:`topk_agreement`) is an argmax
  on the same tensors. :func:`token_means` adds the sums of a step's micro-batches and
  divides by their token count, so the logged ``jsd`` and ``agreement`` are exact token
  means over the step, not means of micro-batch means. :func:`opd_token_sums` gives
  the same sums without a loss (evaluations).
* **The EMA teacher step** (:func:`ema_teacher_step_`): the fp32 shadow moves towards
  the student, the teacher's forward copy is refreshed from it, and the distance that
  remains is returned (:func:`l2_distance`).

Example, one token, K = 1 (a tail bucket makes each side a 2-way distribution): the
student gives its top-1 id probability 0.5 (S = (0.5, 0.5)), the teacher gives the same
id 0.25 (T = (0.25, 0.75)); forward KL(T || S) = 0.25 ln 0.5 + 0.75 ln 1.5 = 0.1308.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from vlreason.algorithms.divergence import topk_token_divergence, vision_opd_loss
from vlreason.algorithms.ema import copy_to_, ema_update_

__all__ = ["ema_teacher_step_", "l2_distance", "opd_loss_and_sums", "opd_token_sums", "token_means",
           "topk_agreement"]

TOKENS = "tokens"  # the key of the token count in opd_token_sums' result


def topk_agreement(student_topk_logprobs_BTK: Tensor, teacher_logprobs_BTK: Tensor) -> Tensor:
    """``[..., K] -> [...]`` bool: the teacher's most likely token among the student's top-k
    ids is the student's own most likely one (``argmax`` on both sides over the same K ids;
    a tie goes to the first position, i.e. the student's higher-ranked id)."""
    if student_topk_logprobs_BTK.shape != teacher_logprobs_BTK.shape:
        raise ValueError(
            f"student {tuple(student_topk_logprobs_BTK.shape)} and teacher "
            f"{tuple(teacher_logprobs_BTK.shape)} top-k log-probs differ in shape"
        )
    return student_topk_logprobs_BTK.argmax(-1) == teacher_logprobs_BTK.argmax(-1)


@torch.no_grad()
def opd_token_sums(
    student_topk_logprobs_BTK: Tensor,
    teacher_logprobs_BTK: Tensor,
    mask_BT: Tensor,
    *,
    kind: str = "jsd",
    alpha: float = 0.5,
    min_tail_prob: float = 1e-6,
) -> dict[str, Tensor]:
    """Masked token sums of the rollout diagnostics, without gradient.

    Returns 0-d tensors: ``divergence`` (sum over the masked tokens of
    :func:`topk_token_divergence` with ``kind``, ``alpha``, ``min_tail_prob``),
    ``agreement`` (count of masked tokens where :func:`topk_agreement` holds) and
    ``tokens`` (the masked token count). Sums of several micro-batches add up; see
    :func:`token_means`.
    """
    student = student_topk_logprobs_BTK.detach()
    teacher = teacher_logprobs_BTK.detach()
    mask = mask_BT.to(student.device).bool()
    divergence_BT = topk_token_divergence(student, teacher, kind, alpha=alpha, min_tail_prob=min_tail_prob)
    agree_BT = topk_agreement(student, teacher)
    return {
        "divergence": divergence_BT[mask].sum(),
        "agreement": agree_BT[mask].float().sum(),
        TOKENS: mask.sum(),
    }


def opd_loss_and_sums(
    student_topk_logprobs_BTK: Tensor,
    teacher_logprobs_BTK: Tensor,
    mask_BT: Tensor,
    **loss_kwargs,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """``(loss, metrics, sums)``: :func:`vision_opd_loss` (``loss_kwargs`` passed on) and
    the step diagnostics' masked sums from the same divergence, without a second pass.

    ``sums`` has the keys of :func:`opd_token_sums` (``divergence``, ``agreement``,
    ``tokens``) and equal values; ``metrics`` is the loss's, less its sums.
    """
    loss, metrics = vision_opd_loss(student_topk_logprobs_BTK, teacher_logprobs_BTK, mask_BT, **loss_kwargs)
    with torch.no_grad():
        agree_BT = topk_agreement(student_topk_logprobs_BTK.detach(), teacher_logprobs_BTK.detach())
        valid = mask_BT.to(agree_BT.device).bool()
        sums = {"divergence": metrics.pop("divergence_sum"), "agreement": agree_BT[valid].float().sum(),
                TOKENS: metrics.pop("tokens")}
    return loss, metrics, sums


def token_means(sums: Sequence[Mapping[str, Tensor | float]]) -> dict[str, float]:
    """Add the :func:`opd_token_sums` of a step's micro-batches (in float64) and divide
    each sum by the total token count (at least 1, so a step without tokens gives 0):
    exact token means over the step. The count itself is left out."""
    total: dict[str, float] = {}
    for part in sums:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + float(value)
    count = max(total.pop(TOKENS, 0.0), 1.0)
    return {key: value / count for key, value in total.items()}


def l2_distance(a_tensors: Iterable[Tensor], b_tensors: Iterable[Tensor]) -> float:
    """``sqrt(sum over tensors of ||a - b||^2)``, each ``b`` cast to its ``a``'s device in
    float32 (``a`` is an fp32 EMA shadow)."""
    squares = sum(
        float((a - b.to(a.device, torch.float32)).pow(2).sum())
        for a, b in zip(a_tensors, b_tensors, strict=True)
    )
    return math.sqrt(squares)


@torch.no_grad()
def ema_teacher_step_(
    teacher_tensors: Sequence[Tensor],
    shadow_fp32_tensors: Sequence[Tensor],
    student_tensors: Sequence[Tensor],
    rate: float,
) -> float:
    """One EMA step of a teacher towards its student, in place; returns the distance left.

        shadow  <- (1 - rate) shadow + rate student        (fp32, :func:`ema_update_`)
        teacher <- shadow, in the teacher's own dtype      (:func:`copy_to_`)

    ``rate`` in [0, 1]; 0 leaves shadow and teacher as they are (a frozen teacher). The
    result is :func:`l2_distance` (shadow, student) after the step.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"EMA rate must lie in [0, 1], got {rate}")
    if rate > 0:
        ema_update_(shadow_fp32_tensors, student_tensors, 1.0 - rate)
        copy_to_(teacher_tensors, shadow_fp32_tensors)
    return l2_distance(shadow_fp32_tensors, student_tensors)
