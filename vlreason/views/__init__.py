"""Image views: resize to the pixel budget, crop to a box, draw a box, patch mask, noise.

All functions are pure and deterministic given their ``seed`` (no global RNG): PIL in,
a new PIL image out. ``VIEWS`` maps a view name to a function with the common signature
``view(img, row, seed, **options) -> PIL.Image`` where ``row`` is a canonical dataset row
(see :mod:`vlreason.data.schema`). Options each view accepts (all keyword-only):

=========  ==============================================================================
view       options
=========  ==============================================================================
resize     ``budget`` (default :data:`DEFAULT_BUDGET`)
crop       ``budget``, ``margin`` 0.1, ``upscale`` 2.0, ``min_size`` 28 (uses boxes[0])
box        ``budget``, ``color`` "red", ``width`` None (uses boxes[0])
mask       ``budget``, ``p`` 0.6, ``patch_size`` 14, ``fill`` 0
noise      ``budget``, ``t`` 500, ``num_steps`` 1000
=========  ==============================================================================

With a ``budget`` every view returns exactly what the model is fed: ``crop`` and ``box``
work in original pixels and resize afterwards; ``mask`` and ``noise`` resize first, so
masked squares coincide with the vision tower's patches. Without one, views other than
``resize`` keep the image's own size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from vlreason.views.budget import (
    DEFAULT_BUDGET,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    PixelBudget,
)
from vlreason.views.crop import crop_box_region, crop_to_box, draw_box
from vlreason.views.mask import patch_mask, patch_mask_grid
from vlreason.views.noise import add_noise, alpha_bar, annealed_timestep

__all__ = [
    "BOX_VIEWS",
    "DEFAULT_BUDGET",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "VIEWS",
    "PixelBudget",
    "add_noise",
    "alpha_bar",
    "annealed_timestep",
    "box_view",
    "crop_box_region",
    "crop_to_box",
    "crop_view",
    "draw_box",
    "first_box",
    "mask_view",
    "noise_view",
    "patch_mask",
    "patch_mask_grid",
    "resize_view",
]

View = Callable[..., Image.Image]


def first_box(row: dict[str, Any], view: str = "crop") -> list[float]:
    """``row["boxes"][0]``, or a ValueError naming the row and the view that needs it."""
    boxes = row.get("boxes") or []
    if len(boxes) == 0:
        raise ValueError(
            f"view {view!r} needs a box, but row {row.get('id', '?')!r} has no 'boxes'; "
            "use a dataset with box annotations or another view"
        )
    return [float(v) for v in boxes[0]]


def _fit(img: Image.Image, budget: PixelBudget | None) -> Image.Image:
    return budget.resize(img) if budget is not None else img


def resize_view(
    img: Image.Image, row: dict[str, Any], seed: int, *, budget: PixelBudget | None = None
) -> Image.Image:
    """The image as the model sees it: resized to ``budget`` (default: DEFAULT_BUDGET)."""
    return (budget or DEFAULT_BUDGET).resize(img)


def crop_view(
    img: Image.Image,
    row: dict[str, Any],
    seed: int,
    *,
    budget: PixelBudget | None = None,
    margin: float = 0.1,
    upscale: float = 2.0,
    min_size: int = 28,
) -> Image.Image:
    """Vision-OPD's teacher view: crop around ``boxes[0]``, enlarged, then fit to ``budget``."""
    box = first_box(row, "crop")
    return _fit(crop_to_box(img, box, margin=margin, upscale=upscale, min_size=min_size), budget)


def box_view(
    img: Image.Image,
    row: dict[str, Any],
    seed: int,
    *,
    budget: PixelBudget | None = None,
    color: str = "red",
    width: int | None = None,
) -> Image.Image:
    """The full image with ``boxes[0]`` outlined (Vision-OPD's optional student hint)."""
    return _fit(draw_box(img, first_box(row, "box"), color=color, width=width), budget)


def mask_view(
    img: Image.Image,
    row: dict[str, Any],
    seed: int,
    *,
    budget: PixelBudget | None = None,
    p: float = 0.6,
    patch_size: int = 14,
    fill: int = 0,
) -> Image.Image:
    """DVRP's masked view: fit to ``budget``, then mask patches with probability ``p``."""
    return patch_mask(_fit(img, budget), p, patch_size=patch_size, seed=seed, fill=fill)


def noise_view(
    img: Image.Image,
    row: dict[str, Any],
    seed: int,
    *,
    budget: PixelBudget | None = None,
    t: int = 500,
    num_steps: int = 1000,
) -> Image.Image:
    """DVRP's perturbed view: fit to ``budget``, then diffusion noise at step ``t``."""
    return add_noise(_fit(img, budget), t, seed=seed, num_steps=num_steps)


VIEWS: dict[str, View] = {
    "resize": resize_view,
    "crop": crop_view,
    "box": box_view,
    "mask": mask_view,
    "noise": noise_view,
}

# Views that read row["boxes"][0].
BOX_VIEWS = frozenset({"crop", "box"})
