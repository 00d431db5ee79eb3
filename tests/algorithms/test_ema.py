"""EMA of weights in fp32 (vlreason.algorithms.ema): hand-worked values, the fp32 shadow
tracks an fp64 reference EMA of a bf16 student, and an EMA accumulated in bf16 does not."""

from __future__ import annotations

import pytest
import torch

from vlreason.algorithms import copy_to_, ema_update_, fp32_shadow


def test_hand_worked_values():
    # decay 0.95: 0.95 * 1 + 0.05 * 2 = 1.05; 0.95 * -4 + 0.05 * 0 = -3.8
    shadow = torch.tensor([1.0, -4.0])
    ema_update_([shadow], [torch.tensor([2.0, 0.0])], 0.95)
    torch.testing.assert_close(shadow, torch.tensor([1.05, -3.8]))
    # a second step from there: 0.95 * 1.05 + 0.05 * 2 = 1.0975
    ema_update_([shadow], [torch.tensor([2.0, 0.0])], 0.95)
    torch.testing.assert_close(shadow, torch.tensor([1.0975, -3.61]))
    # decay 1 keeps the shadow (frozen teacher), decay 0 copies the student
    ema_update_([shadow], [torch.tensor([9.0, 9.0])], 1.0)
    torch.testing.assert_close(shadow, torch.tensor([1.0975, -3.61]))
    ema_update_([shadow], [torch.tensor([9.0, 9.0], dtype=torch.bfloat16)], 0.0)
    torch.testing.assert_close(shadow, torch.tensor([9.0, 9.0]))


def test_refuses_a_low_precision_shadow_and_bad_arguments():
    with pytest.raises(ValueError, match="float32"):
        ema_update_([torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)], 0.95)
    with pytest.raises(ValueError, match="decay"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], 1.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.95)
    with pytest.raises(ValueError, match="tensors"):
        ema_update_([torch.zeros(2)], [], 0.95)


def test_fp32_shadow_aliases_fp32_and_copies_bf16():
    w32 = torch.randn(5)
    w16 = torch.randn(5).to(torch.bfloat16)
    s32, s16 = fp32_shadow([w32, w16])
    assert s32.data_ptr() == w32.data_ptr()  # an fp32 weight is its own shadow
    assert s16.dtype == torch.float32 and s16.data_ptr() != w16.data_ptr()
    ema_update_([s32, s16], [torch.ones(5), torch.ones(5)], 0.5)
    copy_to_([w32, w16], [s32, s16])
    torch.testing.assert_close(w16, s16.to(torch.bfloat16))
    assert torch.equal(w32, s32)


def _ema_runs(steps: int = 400, n: int = 4096, decay: float = 0.95, seed: int = 0):
    """A bf16 student takes ``steps`` small steps (drift 2e-4 plus noise 2e-5 per step on
    weights of size ~1: lr-sized moves, each below a bf16 half-ulp); three
    teachers follow it: the fp64 reference EMA, the fp32-shadow EMA (bf16 forward copy
    refreshed from it) and a control whose EMA is accumulated in bf16 itself."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(n, generator=g)
    student32 = start.clone()  # the student's fp32 masters
    direction = torch.randn(n, generator=g)
    reference = start.double()
    shadow = fp32_shadow([start.to(torch.bfloat16)])[0]
    forward_copy = start.to(torch.bfloat16)
    control = start.to(torch.bfloat16)
    for _ in range(steps):
        student32 += 2e-4 * direction + 2e-5 * torch.randn(n, generator=g)
        student = student32.to(torch.bfloat16)  # what a bf16 student hands over
        reference = decay * reference + (1 - decay) * student.double()
        ema_update_([shadow], [student], decay)
        copy_to_([forward_copy], [shadow])
        control.lerp_(student, 1 - decay)  # the EMA kept in bf16
    return start.double(), reference, shadow.double(), forward_copy.double(), control.double()


def test_fp32_shadow_tracks_the_reference_ema_and_bf16_accumulation_does_not():
    start, reference, shadow, forward_copy, control = _ema_runs()
    moved = (reference - start).norm()
    assert moved > 1.0  # the teacher really moved (about 0.08 per entry, RMS)

    # relative error, against how far the reference EMA moved
    err_shadow = float((shadow - reference).norm() / moved)
    err_control = float((control - reference).norm() / moved)
    assert err_shadow < 1e-3, err_shadow
    # the bf16-accumulated EMA loses most increments to rounding: it lags far behind
    # (measured: shadow 2.6e-6, control 0.46, seeds 0-2)
    assert err_control > 0.3, err_control
    assert err_control > 1000 * err_shadow
    # also against the weights themselves
    assert float((shadow - reference).norm() / reference.norm()) < 1e-3
    # the bf16 forward copy is one bf16 rounding of the shadow (at most 2^-9 relative per entry),
    # not an accumulated drift: it stays as close as bf16 can be
    assert float(((forward_copy - shadow).abs() / shadow.abs().clamp_min(1e-6)).max()) <= 2.0**-8
    assert float((forward_copy - reference).norm() / moved) < 0.05 < err_control
