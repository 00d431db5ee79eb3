"""crop_to_box, draw_box and the crop / box views."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlreason.views import VIEWS, PixelBudget, crop_box_region, crop_to_box, draw_box


def _marked(size=(200, 100), box=(50, 20, 90, 60), colour=(255, 0, 0)) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste(colour, box)
    return img


def test_crop_contains_box_with_margin_and_is_upscaled() -> None:
    img, box = _marked(), (50, 20, 90, 60)  # 40 x 40 box
    region = crop_box_region(img.size, box, margin=0.1)
    assert region == (46, 16, 94, 64)  # 0.1 * 40 = 4 px each side
    out = crop_to_box(img, box, margin=0.1, upscale=2.0)
    assert out.size == (96, 96)
    arr = np.asarray(out)
    # The whole red box is inside: the centre is red, a ring of white context surrounds it.
    assert tuple(arr[48, 48]) == (255, 0, 0)
    assert tuple(arr[2, 2]) == (255, 255, 255)
    red = (arr[..., 0] > 200) & (arr[..., 1] < 60)
    assert 0.6 < red.mean() < 0.8  # (40 / 48) ** 2 ~ 0.69


def test_crop_clamped_to_image() -> None:
    img = _marked()
    assert crop_box_region(img.size, (-10, -5, 30, 20), margin=0.5) == (0, 0, 50, 33)  # 20 + 12.5, ceil
    assert crop_box_region(img.size, (190, 90, 250, 130), margin=0.0) == (172, 72, 200, 100)


def test_small_box_grows_to_min_size() -> None:
    left, top, right, bottom = crop_box_region((200, 100), (10, 10, 14, 14), margin=0.0, min_size=28)
    assert (right - left, bottom - top) == (28, 28)
    assert left <= 10 and right >= 14 and top <= 10 and bottom >= 14
    # Near a corner it shifts inward instead of shrinking.
    assert crop_box_region((200, 100), (0, 0, 4, 4), margin=0.0, min_size=28) == (0, 0, 28, 28)


@pytest.mark.parametrize("box", [(10, 10, 10, 20), (50, 50, 40, 60), (300, 0, 400, 10), (1, 2, 3)])
def test_bad_box_raises(box) -> None:
    with pytest.raises(ValueError, match="box"):
        crop_to_box(_marked(), box)


def test_draw_box_outlines_and_copies() -> None:
    img = Image.new("RGB", (100, 100), (255, 255, 255))
    out = draw_box(img, (20, 30, 60, 70), width=2)
    arr = np.asarray(out)
    assert tuple(arr[30, 40]) == (255, 0, 0)  # top edge
    assert tuple(arr[69, 40]) == (255, 0, 0)  # bottom edge (x1, y1 exclusive)
    assert tuple(arr[50, 40]) == (255, 255, 255)  # inside untouched
    assert img.getpixel((40, 30)) == (255, 255, 255)  # input unchanged
    auto = np.asarray(draw_box(Image.new("RGB", (1000, 1000), "white"), (100, 100, 500, 500)))
    assert (auto[100:120, 300, 1] == 0).sum() == 10  # default width ~1% of the side


def test_crop_and_box_views_use_first_box_and_budget() -> None:
    img = _marked()
    row = {"id": "r", "boxes": [[50, 20, 90, 60], [0, 0, 5, 5]]}
    budget = PixelBudget(56 * 56, 112 * 112)
    crop = VIEWS["crop"](img, row, 0, budget=budget)
    assert crop.size == budget.target_size(96, 96)
    assert VIEWS["box"](img, row, 0).size == img.size
    for name in ("crop", "box"):
        with pytest.raises(ValueError, match="no 'boxes'"):
            VIEWS[name](img, {"id": "x", "boxes": []}, 0)
