"""Exponential moving average of weights, accumulated in fp32.

``shadow <- decay * shadow + (1 - decay) * student`` (Vision-OPD's teacher: decay 0.95,
i.e. weight 0.05 on the student, after every optimizer step).

Why an fp32 shadow: with decay 0.95 one update moves the average by 0.05 x (student -
shadow). When the student moves by a small learning-rate step, that increment is far
below half a bf16 unit in the last place of the weight (bf16 keeps 8 significant bits:
a weight near 1 rounds to multiples of 2^-7 = 0.0078), so an average kept *in bf16*
rounds every increment away and stays where it started. Keeping the running average in
fp32 (24 significant bits) and deriving the bf16 copy that the teacher's forward uses
from it (:func:`copy_to_`) keeps the average exact to fp32 rounding; the forward copy
then differs from it only by one bf16 rounding, which does not accumulate.
tests/algorithms/test_ema.py measures both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["copy_to_", "ema_update_", "fp32_shadow"]


@torch.no_grad()
def ema_update_(shadow_fp32_tensors: Iterable[Tensor], student_tensors: Iterable[Tensor], decay: float) -> None:
    """In place: ``shadow <- decay * shadow + (1 - decay) * student``, per tensor pair.

    ``shadow_fp32_tensors`` must be float32 (a ``ValueError`` otherwise: the point is to
    accumulate in fp32); ``student_tensors`` may have any floating dtype and device, they
    are converted to the shadow's. ``decay`` in [0, 1]: 1 keeps the shadow unchanged
    (a frozen teacher), 0 copies the student.

    Example (decay 0.95): shadow 1.0, student 2.0 -> 0.95 * 1.0 + 0.05 * 2.0 = 1.05.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    shadows, students = list(shadow_fp32_tensors), list(student_tensors)
    if len(shadows) != len(students):
        raise ValueError(f"{len(shadows)} shadow tensors but {len(students)} student tensors")
    for shadow, student in zip(shadows, students):
        if shadow.dtype != torch.float32:
            raise ValueError(f"the EMA shadow must be float32, got {shadow.dtype}")
        if shadow.shape != student.shape:
            raise ValueError(f"shape mismatch: shadow {tuple(shadow.shape)} vs student {tuple(student.shape)}")
        if decay == 1.0:
            continue
        # lerp: shadow + (1 - decay) * (student - shadow), all in fp32
        shadow.lerp_(student.detach().to(device=shadow.device, dtype=torch.float32), 1.0 - decay)


@torch.no_grad()
def copy_to_(targets: Iterable[Tensor], sources: Iterable[Tensor]) -> None:
    """Refresh the forward copies (any dtype, e.g. bf16) from the fp32 shadow: one
    rounding per refresh, never accumulated. A target that *is* its source (an fp32
    model whose parameter serves as its own shadow) is left alone."""
    for target, source in zip(targets, sources, strict=True):
        if target.data_ptr() == source.data_ptr() and target.dtype == source.dtype:
            continue
        target.copy_(source.to(device=target.device, dtype=target.dtype))


@torch.no_grad()
def fp32_shadow(tensors: Iterable[Tensor]) -> list[Tensor]:
    """An fp32 shadow of ``tensors``: an fp32 tensor is its own shadow (no copy, no extra
    memory; updating the shadow updates it), any other dtype gets an fp32 copy."""
    return [t.detach() if t.dtype == torch.float32 else t.detach().float().clone() for t in tensors]
