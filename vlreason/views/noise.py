"""Diffusion-style noise (DVRP's perturbed view) and DVRP's annealed timestep.

Schedule: the standard DDPM linear betas, 1e-4 to 0.02 over ``num_steps`` (1,000)
steps. ``t`` counts noising steps: ``alpha_bar(0) == 1`` (no noise) and
``alpha_bar(t) = prod_{s=1..t} (1 - beta_s)``; ``t = num_steps`` is almost pure noise.

Two places to apply it:

- :func:`add_noise`: on a PIL image, the result rounded and clipped back to 8-bit pixels
  (previews, the ``noise`` view);
- :func:`noise_pixel_values`: on the normalised ``pixel_values`` tensor a Qwen-VL
  processor produced, in float (no clipping, no rounding): what DVRP trains on. Clipping
  to [0, 255] weakens and biases the noise at large t: at t = 500, sqrt(1 - abar) = 0.96
  in [-1, 1] units, so about 30% of mid-grey pixels, and more of darker or brighter
  ones, land outside the range and are cut back to its edge.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
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


def noise_pixel_values(
    pixel_values_RD: torch.Tensor,
    t: int,
    *,
    image_mean: tuple[float, ...],
    image_std: tuple[float, ...],
    temporal_patch_size: int = 2,
    seed: int = 0,
    eps_RCPP: torch.Tensor | np.ndarray | None = None,
    num_steps: int = NUM_STEPS,
) -> torch.Tensor:
    """The diffusion noise of :func:`add_noise` applied to one image's processor output.

    ``pixel_values_RD``: the image's rows of a Qwen-VL processor's ``pixel_values``, one
    row per patch, columns laid out ``[C, temporal_patch_size, P, P]`` and normalised:
    ``n = (x - mean_c) / std_c`` with ``x`` the pixel in [0, 1]. In the [-1, 1] units of the
    schedule (``x' = 2 x - 1``) the noised pixel is ``y' = sqrt(abar) x' + sqrt(1 - abar)
    eps``, which in normalised units is

        n_y = sqrt(abar) n + (1 - sqrt(abar)) (0.5 - mean_c) / std_c
              + sqrt(1 - abar) eps / (2 std_c)

    computed in float64 and returned in the input's dtype: nothing is clipped to [0, 1] or
    rounded to 8 bits. ``eps`` is one standard normal per pixel and channel, ``[R, C, P,
    P]``, shared by the ``temporal_patch_size`` copies of a still image (the processor
    repeats the frame; independent noise per copy would not be noise on the image). It
    is drawn from ``numpy.random.default_rng(seed)`` unless ``eps_RCPP`` is given.
    """
    ab = alpha_bar(t, num_steps)
    channels = len(image_mean)
    rows, width = pixel_values_RD.shape
    patch = math.isqrt(width // (channels * temporal_patch_size))
    if channels * temporal_patch_size * patch * patch != width or len(image_std) != channels:
        raise ValueError(f"pixel_values rows of width {width} are not [C={channels}, "
                         f"T={temporal_patch_size}, P, P] with {len(image_std)} std values")
    if eps_RCPP is None:
        eps_RCPP = np.random.default_rng(seed).standard_normal((rows, channels, patch, patch))
    eps = torch.as_tensor(eps_RCPP, dtype=torch.float64, device=pixel_values_RD.device)
    if eps.shape != (rows, channels, patch, patch):
        raise ValueError(f"eps must be [{rows}, {channels}, {patch}, {patch}], got {tuple(eps.shape)}")
    mean = torch.tensor(image_mean, dtype=torch.float64, device=eps.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float64, device=eps.device).view(1, -1, 1, 1, 1)
    n = pixel_values_RD.to(torch.float64).view(rows, channels, temporal_patch_size, patch, patch)
    root = math.sqrt(ab)
    out = root * n + (1.0 - root) * (0.5 - mean) / std + math.sqrt(1.0 - ab) * eps[:, :, None] / (2.0 * std)
    return out.reshape(rows, width).to(pixel_values_RD.dtype)


def annealed_timestep(progress: float, t_init: int = 500, gamma: float = 10.0) -> int:
    """DVRP's noise level over training: ``round(t_init * sigmoid(gamma * (0.5 - progress)))``.

    ``progress`` is the fraction of training done (clamped to [0, 1]). With the defaults:
    497 at the start, 250 half-way, 3 at the end.
    """
    progress = min(1.0, max(0.0, float(progress)))
    z = gamma * (0.5 - progress)
    return int(round(t_init / (1.0 + math.exp(-z))))
