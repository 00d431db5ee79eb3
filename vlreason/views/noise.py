"""Diffusion-style noise (DVRP's perturbed view) and DVRP's annealed timestep.

Schedule: the standard DDPM linear betas, 1e-4 to 0.02 over ``num_steps`` (1,000)
steps. ``t`` counts noising steps: ``alpha_bar(0) == 1`` (no noise) and
``alpha_bar(t) = prod_{s=1..t} (1 - beta_s)``; ``t = num_steps`` is almost pure noise.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

BETA_START = 1e-4
BETA_END = 0.02
NUM_STEPS = 1000


@functools.lru_cache(maxsize=8)
def _alpha_bars(num_steps: int) -> np.ndarray:
    """``[num_steps + 1]`` cumulative products, index t = number of noising steps."""
    betas = np.linspace(BETA_START, BETA_END, num_steps, dtype=np.float64)
    out = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    out.setflags(write=False)
    return out


def alpha_bar(t: int, num_steps: int = NUM_STEPS) -> float:
    """Fraction of signal variance kept after ``t`` steps (1.0 at t=0, decreasing in t)."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be > 0, got {num_steps}")
    if not 0 <= t <= num_steps:
        raise ValueError(f"timestep t must be in [0, {num_steps}], got {t}")
    return float(_alpha_bars(num_steps)[int(t)])


def add_noise(img: Image.Image, t: int, seed: int = 0, num_steps: int = NUM_STEPS) -> Image.Image:
    """``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` with x scaled to [-1, 1].

    ``eps`` is standard normal from ``numpy.random.default_rng(seed)``. The result is
    mapped back to uint8 (rounded, clipped). "L" images stay "L"; others become RGB.
    """
    ab = alpha_bar(t, num_steps)
    src = img if img.mode in ("L", "RGB") else img.convert("RGB")
    x = np.asarray(src, dtype=np.float64) / 127.5 - 1.0
    eps = np.random.default_rng(seed).standard_normal(x.shape)
    y = math.sqrt(ab) * x + math.sqrt(1.0 - ab) * eps
    out = np.clip(np.rint((y + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def annealed_timestep(progress: float, t_init: int = 500, gamma: float = 10.0) -> int:
    """DVRP's noise level over training: ``round(t_init * sigmoid(gamma * (0.5 - progress)))``.

    ``progress`` is the fraction of training done (clamped to [0, 1]). With the defaults:
    497 at the start, 250 half-way, 3 at the end.
    """
    progress = min(1.0, max(0.0, float(progress)))
    z = gamma * (0.5 - progress)
    return int(round(t_init / (1.0 + math.exp(-z))))
