"""Box views: the evidence-centred crop (Vision-OPD teacher) and a box drawn on the image."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

Box = Sequence[float]


def _check_box(box: Box, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` as 4 floats, checked to be non-empty and to overlap the image."""
    if len(box) != 4:
        raise ValueError(f"box must be [x0, y0, x1, y1], got {list(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must have x1 > x0 and y1 > y0, got {[x0, y0, x1, y1]}")
    w, h = size
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise ValueError(f"box {[x0, y0, x1, y1]} lies outside the {w}x{h} image")
    return x0, y0, x1, y1


def _grow_interval(lo: float, hi: float, min_len: float, limit: int) -> tuple[int, int]:
    """Integer ``[lo, hi)`` covering the input, at least ``min_len`` long, inside [0, limit]."""
    lo_i, hi_i = max(0, math.floor(lo)), min(limit, math.ceil(hi))
    need = min(limit, math.ceil(min_len)) - (hi_i - lo_i)
    if need > 0:  # widen around the centre, shifting when one side hits the border
        lo_i -= need // 2
        hi_i += need - need // 2
        if lo_i < 0:
            hi_i, lo_i = hi_i - lo_i, 0
        if hi_i > limit:
            lo_i, hi_i = max(0, lo_i - (hi_i - limit)), limit
    return lo_i, hi_i


def crop_box_region(
    size: tuple[int, int], box: Box, margin: float = 0.1, min_size: int = 28
) -> tuple[int, int, int, int]:
    """The integer crop region ``(left, top, right, bottom)`` that :func:`crop_to_box` uses.

    The box grows by ``margin`` times its width (height) on each side, is clamped to the
    image, and is widened to at least ``min_size`` pixels a side where the image allows.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = _check_box(box, size)
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    left, right = _grow_interval(x0 - mx, x1 + mx, min_size, size[0])
    top, bottom = _grow_interval(y0 - my, y1 + my, min_size, size[1])
    return left, top, right, bottom


def crop_to_box(
    img: Image.Image,
    box: Box,
    margin: float = 0.1,
    upscale: float = 2.0,
    min_size: int = 28,
) -> Image.Image:
    """Crop ``img`` around ``box`` and enlarge it (Vision-OPD's teacher view).

    Args:
        img: the original image.
        box: ``[x0, y0, x1, y1]`` in ``img``'s pixels.
        margin: context added on each side, as a fraction of the box's width/height.
        upscale: the crop is resized (bicubic) by this factor (Vision-OPD: 2x).
        min_size: the crop is at least this many original pixels a side (if the image is).
    """
    if upscale <= 0:
        raise ValueError(f"upscale must be > 0, got {upscale}")
    region = crop_box_region(img.size, box, margin=margin, min_size=min_size)
    crop = img.crop(region)
    if upscale == 1.0:
        return crop
    size = (max(1, round(crop.width * upscale)), max(1, round(crop.height * upscale)))
    return crop.resize(size, Image.Resampling.BICUBIC)


def draw_box(
    img: Image.Image, box: Box, color: str | tuple[int, ...] = "red", width: int | None = None
) -> Image.Image:
    """A copy of ``img`` (as RGB) with ``box`` outlined; ``width`` defaults to ~1% of the image."""
    x0, y0, x1, y1 = _check_box(box, img.size)
    if width is None:
        width = max(2, round(0.01 * max(img.size)))
    out = img.convert("RGB") if img.mode != "RGB" else img.copy()
    ImageDraw.Draw(out).rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=int(width))
    return out
