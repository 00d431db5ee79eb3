"""patch_mask / patch_mask_grid and the mask view."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlreason.views import VIEWS, PixelBudget, patch_mask, patch_mask_grid


def _noise_image(w: int, h: int) -> Image.Image:
    # Strictly positive pixels, so fill=0 marks exactly the masked pixels.
    rng = np.random.default_rng(123)
    return Image.fromarray(rng.integers(1, 256, (h, w, 3), dtype=np.uint8))


def test_grid_deterministic_and_seed_dependent() -> None:
    a = patch_mask_grid(20, 30, 0.6, seed=1)
    assert a.shape == (20, 30) and a.dtype == bool
    assert np.array_equal(a, patch_mask_grid(20, 30, 0.6, seed=1))
    assert not np.array_equal(a, patch_mask_grid(20, 30, 0.6, seed=2))


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_mask_ratio_close_to_p(p: float) -> None:
    # 200 x 200 = 40,000 Bernoulli(p) draws: std of the mean <= 0.5 / 200 = 0.0025;
    # a 0.01 tolerance is 4 standard deviations.
    for seed in range(3):
        assert abs(patch_mask_grid(200, 200, p, seed).mean() - p) < 0.01


def test_p_zero_and_one() -> None:
    img = _noise_image(56, 28)
    assert np.array_equal(np.asarray(patch_mask(img, 0.0)), np.asarray(img))
    assert not np.asarray(patch_mask(img, 1.0)).any()


def test_masked_pixels_are_exactly_the_grid_patches() -> None:
    w, h, ps, p, seed = 112, 84, 14, 0.5, 7
    img = _noise_image(w, h)
    out = np.asarray(patch_mask(img, p, patch_size=ps, seed=seed))
    grid = patch_mask_grid(h // ps, w // ps, p, seed)
    zero = (out == 0).all(axis=2)
    expected = np.kron(grid, np.ones((ps, ps), dtype=bool))
    assert np.array_equal(zero, expected)
    # Unmasked pixels untouched.
    assert np.array_equal(out[~zero], np.asarray(img)[~zero])


def test_partial_edge_patches_and_fill() -> None:
    img = _noise_image(30, 20)  # 3 x 2 patches of 14, the last ones partial
    out = np.asarray(patch_mask(img, 1.0, fill=(9, 8, 7)))
    assert (out == (9, 8, 7)).all()
    grey = patch_mask(Image.new("L", (30, 20), 200), 1.0, fill=5)
    assert grey.mode == "L" and np.asarray(grey).max() == 5


def test_partial_edge_patches_follow_the_grid() -> None:
    # 30 x 20 with 14-px patches: columns 0-13 | 14-27 | 28-29 and rows 0-13 | 14-19,
    # a 2 x 3 grid from the top-left whose right column and bottom row are partial.
    img = _noise_image(30, 20)
    cols, rows = [(0, 14), (14, 28), (28, 30)], [(0, 14), (14, 20)]
    corner_seen = set()
    for seed in range(8):
        zero = (np.asarray(patch_mask(img, 0.5, seed=seed)) == 0).all(axis=2)
        grid = patch_mask_grid(2, 3, 0.5, seed)
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):
                block = zero[r0:r1, c0:c1]
                assert block.all() if grid[i, j] else not block.any(), (seed, i, j)
        corner_seen.add(bool(grid[1, 2]))
    assert corner_seen == {True, False}  # the 6 x 2 corner patch was both masked and kept


def test_mask_deterministic_and_input_unchanged() -> None:
    img = _noise_image(56, 56)
    before = np.asarray(img).copy()
    a, b = patch_mask(img, 0.6, seed=3), patch_mask(img, 0.6, seed=3)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(patch_mask(img, 0.6, seed=4)))
    assert np.array_equal(np.asarray(img), before)


def test_mask_view_resizes_first_then_masks_on_patch_grid() -> None:
    img = _noise_image(100, 70)
    budget = PixelBudget(56 * 56, 112 * 112)
    out = VIEWS["mask"](img, {}, 5, budget=budget, p=0.5)
    assert out.size == budget.target_size(100, 70)
    zero = (np.asarray(out) == 0).all(axis=2)
    blocks = zero.reshape(out.height // 14, 14, out.width // 14, 14)
    per_patch = blocks.mean(axis=(1, 3))
    assert set(np.unique(per_patch)) <= {0.0, 1.0}  # every patch all or nothing


def test_invalid_p() -> None:
    with pytest.raises(ValueError, match="probability"):
        patch_mask_grid(2, 2, 1.5)
