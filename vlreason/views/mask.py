"""Patch masking (DVRP's masked view): whole patches blacked out at random."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def patch_mask_grid(h_patches: int, w_patches: int, p: float, seed: int = 0) -> np.ndarray:
    """Boolean ``[h_patches, w_patches]`` grid, True where a patch is masked.

    Each patch is masked independently with probability ``p``, drawn from
    ``numpy.random.default_rng(seed)`` (no global RNG).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mask probability p must be in [0, 1], got {p}")
    if h_patches < 0 or w_patches < 0:
        raise ValueError(f"patch grid must be non-negative, got {h_patches}x{w_patches}")
    rng = np.random.default_rng(seed)
    return rng.random((h_patches, w_patches)) < p


def patch_mask(
    img: Image.Image,
    p: float,
    patch_size: int = 14,
    seed: int = 0,
    fill: int | tuple[int, ...] = 0,
) -> Image.Image:
    """A copy of ``img`` with ``patch_size`` squares set to ``fill`` with probability ``p``.

    The grid starts at the top-left corner, so on an image already resized to the pixel
    budget (sides multiples of 28) the masked squares are exactly the vision tower's
    14-px patches. Partial patches at the right/bottom edge are masked like full ones.
    "L", "RGB" and "RGBA" images keep their mode; others are converted to RGB.
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be > 0, got {patch_size}")
    w, h = img.size
    grid = patch_mask_grid(math.ceil(h / patch_size), math.ceil(w / patch_size), p, seed)
    pixel_mask = np.kron(grid, np.ones((patch_size, patch_size), dtype=bool))[:h, :w]
    src = img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGB")
    arr = np.array(src)  # a copy; [h, w] or [h, w, c]
    if arr.ndim == 3 and isinstance(fill, int):
        fill = (fill,) * arr.shape[2]
    arr[pixel_mask] = fill
    return Image.fromarray(arr)
