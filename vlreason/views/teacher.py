"""Vision-OPD's two views of one row: the student's full image and the teacher's crop,
and the teacher's own pixel budget.

The teacher's image is, in order of preference:

1. the row's ``teacher_images[0]`` when the row carries one (written at preprocessing
   time by ``data_pipelines/opd_crops.py``, as the official data carries the teacher's
   image next to the student's);
2. else the crop of ``boxes[0]`` (:func:`~vlreason.views.crop.crop_to_box`: margin,
   upscale, min_size) built at run time;
3. else (no box) the student's own image.

Only the first image is replaced; a row's further images are the same for both (and
are fitted to the student's budget, so the teacher's larger budget enlarges the crop only).

**The teacher's pixel budget.** The crop is enlarged (paper: 2x) so that the teacher
sees the evidence at a higher resolution than the student. If the teacher's images went
through the student's budget (``rollout.max_pixels``), a crop enlarged beyond it would be
shrunk back and the enlargement undone. :func:`teacher_budget` gives the teacher its own
budget: by default the student's ``max_pixels`` x ``upscale``^2 (a crop as large as the
whole image keeps its enlargement), or explicit ``teacher.min_pixels`` /
``teacher.max_pixels``. Only completion tokens are compared between student and teacher,
so the two prompts may hold different numbers of image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from vlreason.views.budget import PixelBudget
from vlreason.views.crop import crop_to_box, draw_box

__all__ = ["opd_views", "teacher_budget"]


def opd_views(
    images: Sequence[Image.Image],
    boxes: Sequence[Sequence[float]],
    teacher_images: Sequence[Image.Image] = (),
    *,
    view: str = "crop",
    margin: float = 0.1,
    upscale: float = 2.0,
    min_size: int = 28,
    draw: bool = False,
    color: str = "red",
    student_budget: PixelBudget | None = None,
) -> tuple[list[Image.Image], list[Image.Image]]:
    """``(student images, teacher images)`` of one row.

    ``view="full"``: the teacher sees the student's images (no privileged view).
    ``draw``: ``boxes[0]`` is outlined on the student's first image (and on the teacher's
    when it sees the full image). A ``ValueError`` for a row without images or with an
    unusable box. ``student_budget``: every teacher image that is the student's own (all
    but the first, and the first without a crop) is resized to it, so that the teacher's
    larger budget enlarges only the crop (``view="full"`` then gives the teacher exactly
    the student's input).
    """
    if not images:
        raise ValueError("the row has no image")
    if view not in ("crop", "full"):
        raise ValueError(f"view must be crop or full, got '{view}'")
    student = list(images)
    if boxes and draw:
        student[0] = draw_box(images[0], [float(v) for v in boxes[0]], color=color)
    teacher = [student_budget.resize(img) for img in student] if student_budget is not None else list(student)
    if view == "crop" and teacher_images:
        teacher[0] = teacher_images[0]
    elif view == "crop" and boxes:
        teacher[0] = crop_to_box(images[0], [float(v) for v in boxes[0]], margin=margin, upscale=upscale,
                                 min_size=min_size)
    return student, teacher


def teacher_budget(student: PixelBudget, upscale: float, min_pixels: int = 0, max_pixels: int = 0) -> PixelBudget:
    """The teacher view's pixel budget: ``min_pixels`` (0: the student's) and ``max_pixels``
    (0: the student's ``max_pixels`` x ``upscale``^2, never below the student's), same
    ``factor``.

    Example: student 112 x 112 = 12,544 max, upscale 2 -> teacher 50,176 (224 x 224).
    """
    if upscale <= 0:
        raise ValueError(f"upscale must be > 0, got {upscale}")
    lo = min_pixels or student.min_pixels
    hi = max_pixels or max(student.max_pixels, round(student.max_pixels * upscale * upscale))
    return PixelBudget(min_pixels=lo, max_pixels=hi, factor=student.factor)
