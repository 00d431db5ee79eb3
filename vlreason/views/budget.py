"""The pixel budget: the one image-size setting every role shares.

Qwen-VL models see an image as a grid of ``factor x factor`` pixel cells (14-px
patches merged 2x2, so ``factor = 28`` for Qwen2/2.5-VL; 32 for Qwen3-VL). Their
processors resize every image so that both sides are multiples of ``factor`` and the
area lies in ``[min_pixels, max_pixels]`` (``smart_resize``).

A :class:`PixelBudget` is THE single such setting of a run. Rollout, the log-prob
recompute of the policy, the reference model, the teacher and every image view
(resize, crop, mask, noise, box) must use the same budget (``rollout.min_pixels`` /
``rollout.max_pixels``), and the processor must be given the same values. Otherwise
the same completion is scored on a different number of image tokens by different
roles, and the log-prob ratios and KL terms compare distributions conditioned on
different inputs. Views that work on the model's patch grid (``mask``) resize with
the budget first, so their patches line up with the vision tower's.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

# qwen_vl_utils' MAX_RATIO: smart_resize refuses more extreme aspect ratios.
MAX_ASPECT_RATIO = 200

DEFAULT_MIN_PIXELS = 4 * 28 * 28  # 3,136 = 56 x 56
DEFAULT_MAX_PIXELS = 256 * 28 * 28  # 200,704 (about 448 x 448)

SmartResize = Callable[..., tuple[int, int]]


def _smart_resize_reference(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """qwen_vl_utils' ``smart_resize`` rules, for when that package is unavailable.

    Returns ``(h, w)``: both multiples of ``factor`` (at least ``factor``), aspect
    ratio kept as closely as possible, area within ``[min_pixels, max_pixels]``.
    Python's ``round`` (banker's rounding) is used on purpose, as upstream does.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@functools.lru_cache(maxsize=1)
def _smart_resize_impl() -> SmartResize:
    """``qwen_vl_utils.smart_resize`` if importable with the expected signature.

    Imported lazily: ``qwen_vl_utils`` pulls in torch and torchvision (seconds).
    """
    try:
        from qwen_vl_utils import smart_resize
    except Exception:  # not installed, or broken optional deps
        return _smart_resize_reference
    params = list(inspect.signature(smart_resize).parameters)
    if params[:5] != ["height", "width", "factor", "min_pixels", "max_pixels"]:
        return _smart_resize_reference
    return smart_resize


@dataclass(frozen=True)
class PixelBudget:
    """Target image area for the model: sides multiples of ``factor``, area in range.

    Attributes:
        min_pixels: smallest allowed area (pixels) after resizing; smaller images are
            upscaled.
        max_pixels: largest allowed area (pixels); larger images are downscaled.
        factor: side lengths are multiples of this (patch size x spatial merge: 28 for
            Qwen2/2.5-VL, 32 for Qwen3-VL).
    """

    min_pixels: int
    max_pixels: int
    factor: int = 28

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"PixelBudget.factor must be > 0, got {self.factor}")
        if self.min_pixels <= 0 or self.max_pixels <= 0:
            raise ValueError(
                f"PixelBudget pixels must be positive, got min_pixels={self.min_pixels}, "
                f"max_pixels={self.max_pixels}"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"PixelBudget.min_pixels ({self.min_pixels}) must be <= max_pixels "
                f"({self.max_pixels})"
            )
        if self.max_pixels < self.factor**2:
            raise ValueError(
                f"PixelBudget.max_pixels ({self.max_pixels}) is below one "
                f"{self.factor}x{self.factor} cell ({self.factor**2} pixels)"
            )

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The ``(width, height)`` an image of this size is resized to.

        Note the order: PIL's ``(w, h)`` in and out; ``smart_resize`` itself takes and
        returns ``(h, w)``.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        h, w = _smart_resize_impl()(
            int(height), int(width), self.factor, self.min_pixels, self.max_pixels
        )
        return self._keep_one_cell(int(w), int(h))

    def _keep_one_cell(self, w: int, h: int) -> tuple[int, int]:
        """Upstream floors a very thin side to 0 under ``max_pixels``: keep one cell there
        and shorten the long side to stay within ``max_pixels``."""
        f = self.factor
        if w >= f and h >= f:
            return w, h
        w, h = max(f, w), max(f, h)
        if w * h > self.max_pixels:
            if w > h:
                w = max(f, self.max_pixels // (h * f) * f)
            else:
                h = max(f, self.max_pixels // (w * f) * f)
        return w, h

    def resize(self, img: Image.Image) -> Image.Image:
        """A copy of ``img`` resized (bicubic) to :meth:`target_size`."""
        size = self.target_size(*img.size)
        if size == img.size:
            return img.copy()
        return img.resize(size, Image.Resampling.BICUBIC)


DEFAULT_BUDGET = PixelBudget(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
