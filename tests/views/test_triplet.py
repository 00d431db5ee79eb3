"""DVRP's views of a row: whole-patch masks drawn with probability p, seeds that are a
pure function of the image's coordinates, and the annealed noise timestep."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vlreason.views import PixelBudget, patch_mask_grid
from vlreason.views.triplet import MASK_VIEW, NOISE_VIEW, build_triplet, noise_timestep, view_seed


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(1, 256, (300, 420, 3), dtype=np.uint8))  # no black pixels


def test_triplet_masks_whole_patches_with_probability_p():
    img = _image()
    budget = PixelBudget(min_pixels=56 * 56, max_pixels=448 * 448, factor=28)
    kwargs = dict(budget=budget, patch_size=14, mask_prob=0.6, seed=3, step=5, row_index=1)
    t = build_triplet([img], **kwargs)
    orig, masked = t.original[0], t.masked[0]
    assert orig.size == masked.size == budget.resize(img).size
    assert np.array_equal(np.asarray(orig), np.asarray(budget.resize(img)))
    w, h = orig.size
    assert w % 28 == 0 and h % 28 == 0
    grid = patch_mask_grid(h // 14, w // 14, 0.6, view_seed(3, 5, 0, 1, 0, MASK_VIEW))
    m = np.asarray(masked).reshape(h // 14, 14, w // 14, 14, 3)
    o = np.asarray(orig).reshape(h // 14, 14, w // 14, 14, 3)
    black = (m == 0).all(axis=(1, 3, 4))
    kept = (m == o).all(axis=(1, 3, 4))
    assert np.array_equal(black, grid) and np.array_equal(kept, ~grid)  # whole patches, on the grid
    assert abs(grid.mean() - 0.6) < 0.05 and grid.size > 500
    assert t.masked_patches == grid.sum() and t.total_patches == grid.size
    assert t.noise_seeds == [view_seed(3, 5, 0, 1, 0, NOISE_VIEW)]
    again = build_triplet([img], **kwargs)  # deterministic per (seed, step, row)
    assert np.array_equal(np.asarray(again.masked[0]), np.asarray(masked))
    other = build_triplet([img], **{**kwargs, "step": 6})
    assert not np.array_equal(np.asarray(other.masked[0]), np.asarray(masked))
    assert other.noise_seeds != t.noise_seeds


def test_two_images_get_their_own_draws():
    img = _image()
    budget = PixelBudget(min_pixels=56 * 56, max_pixels=112 * 112, factor=28)
    t = build_triplet([img, img], budget=budget, patch_size=14, mask_prob=0.5, seed=0)
    assert len(t.masked) == 2 and len(set(t.noise_seeds)) == 2
    assert not np.array_equal(np.asarray(t.masked[0]), np.asarray(t.masked[1]))


def test_view_seed_is_a_pure_function_of_the_coordinates():
    coords = (0, 3, 1, 2, 0, MASK_VIEW)
    assert view_seed(*coords) == view_seed(*coords)
    seeds = {view_seed(*coords[:k], coords[k] + 1, *coords[k + 1:]) for k in range(6)}
    assert len(seeds) == 6 and view_seed(*coords) not in seeds


def test_noise_timestep_anneals():
    assert [noise_timestep(s, 100) for s in (0, 50, 100)] == [497, 250, 3]
    assert [noise_timestep(s, 4) for s in range(4)] == [497, 462, 250, 38]
    assert noise_timestep(0, 10, t_init=100) == 99 and noise_timestep(200, 100) == 3  # clamped
