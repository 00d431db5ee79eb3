"""Vision-OPD's diagnostics and EMA teacher step (vlreason.algorithms.opd), on small
hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from vlreason.algorithms.opd import (
    ema_teacher_step_,
    l2_distance,
    opd_token_sums,
    token_means,
    topk_agreement,
)


def logs(*probs):
    return torch.tensor(probs).log()


def test_agreement_compares_the_argmax_over_the_same_k_ids():
    student = torch.stack([logs(0.5, 0.3, 0.1), logs(0.5, 0.3, 0.1), logs(0.4, 0.4, 0.1)])
    teacher = torch.stack([logs(0.6, 0.2, 0.1), logs(0.1, 0.7, 0.1), logs(0.3, 0.3, 0.3)])
    # same top-1 | the teacher prefers the student's second id | ties go to the first id
    assert topk_agreement(student, teacher).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="differ in shape"):
        topk_agreement(student, teacher[:, :2])


def test_token_sums_hand_worked_divergences():
    # one token, K = 1: S = (0.5, 0.5) with its tail, T = (0.25, 0.75)
    s, t = logs(0.5)[None, None], logs(0.25)[None, None]
    mask = torch.ones(1, 1)
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(T || S) = 0.1308
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)    # KL(S || T) = 0.1438
    m = (0.375, 0.625)  # JSD 0.5: M = (S + T) / 2
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))  # 0.0338
    for kind, want in (("forward_kl", forward), ("reverse_kl", reverse), ("jsd", jsd)):
        got = opd_token_sums(s, t, mask, kind=kind, alpha=0.5)
        assert got["divergence"].item() == pytest.approx(want, abs=1e-6), kind
        assert got["agreement"].item() == 1.0 and got["tokens"].item() == 1


def test_token_sums_count_only_masked_tokens_and_carry_no_gradient():
    # [B=1, T=3, K=2]: token 0 identical (divergence 0, agree), token 1 disagrees,
    # token 2 is padding with a huge divergence that must not count
    student = torch.stack([logs(0.6, 0.3), logs(0.6, 0.3), logs(0.9, 0.05)])[None].requires_grad_()
    teacher = torch.stack([logs(0.6, 0.3), logs(0.2, 0.7), logs(1e-4, 1e-4)])[None]
    mask = torch.tensor([[1, 1, 0]])
    got = opd_token_sums(student, teacher, mask, kind="forward_kl")
    # token 1, 3-way with tails: T = (0.2, 0.7, 0.1), S = (0.6, 0.3, 0.1)
    want = 0.2 * math.log(0.2 / 0.6) + 0.7 * math.log(0.7 / 0.3)
    assert got["divergence"].item() == pytest.approx(want, abs=1e-6)
    assert got["agreement"].item() == 1.0 and got["tokens"].item() == 2
    assert not any(v.requires_grad for v in got.values())


def test_token_means_are_exact_over_micro_batches():
    # 4 tokens with divergence sum 1 and 2 agreeing, then 2 tokens with sum 3, 1 agreeing:
    # (1 + 3) / 6 and (2 + 1) / 6, not the mean of the micro-batch means (0.875, 0.5)
    sums = [{"divergence": torch.tensor(1.0), "agreement": torch.tensor(2.0), "tokens": torch.tensor(4)},
            {"divergence": torch.tensor(3.0), "agreement": torch.tensor(1.0), "tokens": torch.tensor(2)}]
    assert token_means(sums) == pytest.approx({"divergence": 4 / 6, "agreement": 3 / 6})
    # no tokens at all: zeros, not a division by zero
    empty = [{"divergence": torch.tensor(0.0), "agreement": torch.tensor(0.0), "tokens": torch.tensor(0)}]
    assert token_means(empty) == {"divergence": 0.0, "agreement": 0.0}


def test_l2_distance_over_several_tensors():
    assert l2_distance([torch.tensor([3.0]), torch.tensor([0.0, 4.0])],
                       [torch.zeros(1), torch.zeros(2, dtype=torch.bfloat16)]) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        l2_distance([torch.zeros(1)], [])


def test_ema_teacher_step_moves_the_shadow_and_refreshes_the_teacher():
    # rate 0.05: shadow 0.95 * 1 + 0.05 * 2 = 1.05 and 0.95 * -4 + 0.05 * 0 = -3.8;
    # the bf16 teacher is the shadow rounded once (1.05 -> 1.046875, -3.8 -> -3.796875)
    shadow = torch.tensor([1.0, -4.0])
    teacher = shadow.to(torch.bfloat16)
    student = torch.tensor([2.0, 0.0])
    distance = ema_teacher_step_([teacher], [shadow], [student], 0.05)
    torch.testing.assert_close(shadow, torch.tensor([1.05, -3.8]))
    assert teacher.dtype == torch.bfloat16
    assert teacher.tolist() == [1.046875, -3.796875]
    assert distance == pytest.approx(math.hypot(2.0 - 1.05, 0.0 + 3.8), rel=1e-6)


def test_ema_rate_zero_keeps_the_teacher_and_bad_rates_are_refused():
    shadow, teacher = torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.bfloat16)
    assert ema_teacher_step_([teacher], [shadow], [torch.tensor([3.0])], 0.0) == pytest.approx(2.0)
    assert shadow.item() == 1.0 and teacher.item() == 1.0
    with pytest.raises(ValueError, match="rate"):
        ema_teacher_step_([teacher], [shadow], [torch.tensor([3.0])], -0.1)


def test_loss_and_sums_give_the_diagnostics_of_a_separate_pass_from_one_divergence():
    """opd_loss_and_sums: the loss of vision_opd_loss and sums equal to opd_token_sums'
    (one divergence computation serves both), the loss's own sums removed from metrics."""
    from vlreason.algorithms.divergence import vision_opd_loss
    from vlreason.algorithms.opd import opd_loss_and_sums

    gen = torch.Generator().manual_seed(0)
    student = torch.log_softmax(torch.randn(3, 5, 8, generator=gen), -1)[..., :4].requires_grad_()
    teacher = torch.log_softmax(torch.randn(3, 5, 8, generator=gen), -1)[..., :4]
    mask = (torch.rand(3, 5, generator=gen) > 0.3).float()
    loss, metrics, sums = opd_loss_and_sums(student, teacher, mask, kind="jsd", alpha=0.5)
    expected_loss, _ = vision_opd_loss(student, teacher, mask, kind="jsd", alpha=0.5)
    expected = opd_token_sums(student, teacher, mask, kind="jsd", alpha=0.5)
    torch.testing.assert_close(loss, expected_loss)
    assert sums.keys() == expected.keys()
    for key in sums:
        torch.testing.assert_close(sums[key].float(), expected[key].float())
    assert "divergence_sum" not in metrics and "tokens" not in metrics and "weight_mean" in metrics
    loss.backward()
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
