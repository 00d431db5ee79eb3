"""DVRP's image views of a training row: original, masked, perturbed (the "triplet").

The original is the row's image resized to the run's pixel budget (what the rollout
saw). The masked view blacks out whole patches of that resized image (the family's
patch size), so the masked squares are exactly the vision tower's patches and the
image-token count does not change. The perturbed view is diffusion noise applied to the
processor's normalised pixel tensor of the original, in float
(:func:`vlreason.views.noise.noise_pixel_values`); this module gives its per-image seeds.

Every random draw is seeded by :func:`view_seed` from the image's coordinates (seed,
step, rank, row index in the step, image index, view), never from a running RNG, so a
resumed run draws the same views as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vlreason.views.budget import PixelBudget
from vlreason.views.mask import patch_mask, patch_mask_grid
from vlreason.views.noise import annealed_timestep

MASK_VIEW = 1
NOISE_VIEW = 2


def view_seed(seed: int, step: int, rank: int, row_index: int, image_index: int, view: int) -> int:
    """A seed for one view of one image, a pure function of its coordinates (resume-exact)."""
    return int(np.random.SeedSequence([seed, step, rank, row_index, image_index, view]).generate_state(1)[0])


def noise_timestep(step: int, horizon: int, *, t_init: int = 500, gamma: float = 10.0) -> int:
    """The perturbed view's timestep at 0-based ``step`` of a ``horizon``-step anneal:
    ``annealed_timestep(step / horizon)`` (497, 250, 3 at the start, middle and end)."""
    return annealed_timestep(step / max(horizon, 1), t_init=t_init, gamma=gamma)


@dataclass
class Triplet:
    """One row's views: ``original`` and ``masked`` images, the noise seed of each image."""

    original: list[Image.Image] = field(default_factory=list)  # resized to the budget
    masked: list[Image.Image] = field(default_factory=list)
    noise_seeds: list[int] = field(default_factory=list)
    masked_patches: int = 0
    total_patches: int = 0


def build_triplet(images: list[Image.Image], *, budget: PixelBudget, patch_size: int, mask_prob: float,
                  seed: int = 0, step: int = 0, rank: int = 0, row_index: int = 0) -> Triplet:
    """DVRP's views of one row's ``images`` at 0-based ``step``.

    Every image is first resized to ``budget`` (sides are multiples of the family's
    ``factor``, hence of ``patch_size``), then masked, so no view changes the
    image-token count. ``masked_patches`` / ``total_patches`` count the mask draws.
    """
    out = Triplet()
    for i, img in enumerate(images):
        base = budget.resize(img.convert("RGB"))
        mask_seed = view_seed(seed, step, rank, row_index, i, MASK_VIEW)
        w, h = base.size
        grid = patch_mask_grid(math.ceil(h / patch_size), math.ceil(w / patch_size), mask_prob, mask_seed)
        out.original.append(base)
        out.masked.append(patch_mask(base, mask_prob, patch_size=patch_size, seed=mask_seed))
        out.noise_seeds.append(view_seed(seed, step, rank, row_index, i, NOISE_VIEW))
        out.masked_patches += int(grid.sum())
        out.total_patches += grid.size
    return out
