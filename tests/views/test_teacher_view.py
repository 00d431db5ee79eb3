"""Vision-OPD's two views (vlreason.views.teacher): where the teacher's image comes from,
and its own pixel budget keeps the crop's enlargement that the student's would undo."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlreason.views import PixelBudget, crop_to_box
from vlreason.views.teacher import opd_views, teacher_budget


def _image(w=320, h=240, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


BOX = [100.0, 80.0, 140.0, 110.0]


def test_teacher_image_prefers_the_rows_teacher_images_then_the_crop_then_the_full_image():
    full, other, given = _image(), _image(seed=1), _image(50, 40, seed=2)
    s, t = opd_views([full, other], [BOX], [given])
    assert s == [full, other] and t[0] is given and t[1] is other
    s, t = opd_views([full], [BOX])
    expected = crop_to_box(full, BOX, margin=0.1, upscale=2.0, min_size=28)
    assert np.array_equal(np.asarray(t[0]), np.asarray(expected))
    s, t = opd_views([full], [])  # no box: the full image for both
    assert t == s == [full]
    s, t = opd_views([full], [BOX], [given], view="full")  # no privileged view
    assert t == s
    s, t = opd_views([full], [BOX], draw=True)
    assert s[0].size == full.size and not np.array_equal(np.asarray(s[0]), np.asarray(full))
    with pytest.raises(ValueError, match="no image"):
        opd_views([], [BOX])
    with pytest.raises(ValueError, match="view"):
        opd_views([full], [BOX], view="zoom")


def test_student_budget_fits_every_teacher_image_but_the_crop():
    student = PixelBudget(56 * 56, 112 * 112)
    full, other = _image(), _image(seed=1)
    s, t = opd_views([full, other], [BOX], student_budget=student)
    assert t[1].size == student.target_size(*other.size)  # the same input as the student's
    assert t[0].size == crop_to_box(full, BOX).size  # the crop keeps its own size
    _, t = opd_views([full], [BOX], view="full", student_budget=student)
    assert t[0].size == student.target_size(*full.size)


def test_teacher_budget_defaults_and_keeps_the_enlargement():
    student = PixelBudget(3136, 112 * 112)
    assert teacher_budget(student, 2.0) == PixelBudget(3136, 4 * 112 * 112)
    assert teacher_budget(student, 2.0, 1000, 9000) == PixelBudget(1000, 9000)
    assert teacher_budget(student, 0.5).max_pixels == student.max_pixels  # never below the student's
    with pytest.raises(ValueError):
        teacher_budget(student, 0)
    # A 448 x 448 image: the student sees it at 112 x 112 (a 1/4 scale). The teacher's 2x
    # crop of a 112-px region (224 x 224 px) under the student's budget would be shrunk
    # back to 112 x 112 (the region at 1x); under the teacher's budget it stays 224 x 224:
    # the region at twice the resolution the student's budget allows a crop.
    image = _image(448, 448)
    region = [160.0, 160.0, 272.0, 272.0]
    crop = crop_to_box(image, region, margin=0.0, upscale=2.0)
    student_scale = student.target_size(*image.size)[0] / image.size[0]
    under_student = student.target_size(*crop.size)[0] / 112
    under_teacher = teacher_budget(student, 2.0).target_size(*crop.size)[0] / 112
    assert student_scale == pytest.approx(0.25)
    assert under_student == pytest.approx(student_scale * 4)  # 112 px region -> 112 px: 1x, not 0.5x
    assert under_teacher == pytest.approx(2 * student_scale * 4)  # 224 px: twice what the student budget gives
    assert under_teacher / (student_scale * 4) == pytest.approx(2.0)
