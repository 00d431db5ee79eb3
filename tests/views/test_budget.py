"""PixelBudget: smart_resize rules, validation, resize."""

from __future__ import annotations

import itertools

import pytest
from PIL import Image

from vlreason.views import DEFAULT_BUDGET, VIEWS, PixelBudget
from vlreason.views.budget import _smart_resize_impl, _smart_resize_reference

SIZES = [(1, 1), (28, 28), (112, 112), (100, 37), (37, 100), (640, 480), (1920, 1080),
         (4000, 3000), (30, 900), (2048, 29), (449, 449)]
BUDGETS = [PixelBudget(56 * 56, 448 * 448), PixelBudget(28 * 28, 28 * 28 * 16),
           PixelBudget(4 * 32 * 32, 256 * 32 * 32, factor=32)]


@pytest.mark.parametrize(("budget", "size"), list(itertools.product(BUDGETS, SIZES)))
def test_target_size_multiple_of_factor_within_budget(budget: PixelBudget, size) -> None:
    w, h = budget.target_size(*size)
    assert w % budget.factor == 0 and h % budget.factor == 0
    assert w >= budget.factor and h >= budget.factor
    assert w * h <= budget.max_pixels
    # min_pixels is met unless the image had to shrink for max_pixels.
    assert w * h >= budget.min_pixels


@pytest.mark.parametrize(("budget", "size"), list(itertools.product(BUDGETS, SIZES)))
def test_target_size_is_a_fixed_point(budget: PixelBudget, size) -> None:
    # A resized image is not resized again (by the processor given the same budget).
    target = budget.target_size(*size)
    assert budget.target_size(*target) == target


def test_target_size_keeps_aspect_ratio() -> None:
    w, h = PixelBudget(56 * 56, 448 * 448).target_size(1920, 1080)
    assert abs(w / h - 1920 / 1080) < 0.05
    # PIL (w, h) order, not smart_resize's (h, w): a wide image stays wide.
    assert w > h


def test_small_image_upscaled_large_downscaled() -> None:
    budget = PixelBudget(112 * 112, 224 * 224)
    assert budget.target_size(28, 28) == (112, 112)
    assert budget.target_size(896, 896) == (224, 224)
    assert budget.target_size(168, 168) == (168, 168)  # already fits: unchanged


def test_reference_matches_qwen_vl_utils() -> None:
    qwen = pytest.importorskip("qwen_vl_utils").smart_resize
    for budget, (w, h) in itertools.product(BUDGETS, SIZES):
        args = (h, w, budget.factor, budget.min_pixels, budget.max_pixels)
        assert _smart_resize_reference(*args) == tuple(qwen(*args))
    assert _smart_resize_impl() is qwen  # the real one is used when importable


def test_resize_gives_target_size_and_copies() -> None:
    img = Image.new("RGB", (640, 480), (10, 20, 30))
    budget = PixelBudget(56 * 56, 224 * 224)
    out = budget.resize(img)
    assert out.size == budget.target_size(640, 480)
    same = PixelBudget(56 * 56, 1000 * 1000).resize(Image.new("RGB", (112, 56)))
    assert same.size == (112, 56)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_pixels": 10, "max_pixels": 5}, "min_pixels"),
        ({"min_pixels": 0, "max_pixels": 5000}, "positive"),
        ({"min_pixels": 100, "max_pixels": -1}, "positive"),
        ({"min_pixels": 100, "max_pixels": 5000, "factor": 0}, "factor"),
        ({"min_pixels": 100, "max_pixels": 500}, "cell"),
    ],
)
def test_invalid_budget_raises_clear_error(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        PixelBudget(**kwargs)


def test_budget_is_frozen_and_default_valid() -> None:
    with pytest.raises(AttributeError):
        DEFAULT_BUDGET.min_pixels = 1  # type: ignore[misc]
    assert DEFAULT_BUDGET.min_pixels <= DEFAULT_BUDGET.max_pixels


def test_resize_view_uses_budget() -> None:
    img = Image.new("RGB", (500, 300))
    budget = PixelBudget(56 * 56, 112 * 112)
    assert VIEWS["resize"](img, {}, 0, budget=budget).size == budget.target_size(500, 300)
