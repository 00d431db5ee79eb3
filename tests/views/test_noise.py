"""DDPM schedule, add_noise, annealed_timestep and the noise view."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from vlreason.views import VIEWS, add_noise, alpha_bar, annealed_timestep


def _image() -> Image.Image:
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([*np.meshgrid(x, x[::-1]), np.full((64, 64), 128, np.uint8)], -1))


def test_alpha_bar_values_and_monotone() -> None:
    assert alpha_bar(0) == 1.0
    assert alpha_bar(1) == pytest.approx(1 - 1e-4)
    # Hand check: 1 - beta_2 with beta_2 = 1e-4 + (0.02 - 1e-4) / 999.
    assert alpha_bar(2) == pytest.approx((1 - 1e-4) * (1 - (1e-4 + 0.0199 / 999)))
    values = [alpha_bar(t) for t in range(0, 1001)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] < 1e-4  # ~4e-5: nearly pure noise at t = 1000
    assert 0.07 < alpha_bar(500) < 0.09
    with pytest.raises(ValueError):
        alpha_bar(1001)


def test_noise_level_rises_with_t() -> None:
    img = _image()
    x = np.asarray(img, dtype=np.float64)
    mse = [((np.asarray(add_noise(img, t, seed=0), dtype=np.float64) - x) ** 2).mean()
           for t in (0, 10, 50, 200, 500, 1000)]
    assert mse[0] == 0.0  # t = 0 is the identity
    assert all(a < b for a, b in zip(mse, mse[1:]))


def test_noise_deterministic_per_seed() -> None:
    img = _image()
    a, b = add_noise(img, 200, seed=1), add_noise(img, 200, seed=1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(add_noise(img, 200, seed=2)))
    assert a.size == img.size and a.mode == "RGB"


def test_noise_statistics_match_formula() -> None:
    # Mid-grey (x = 0.0039) at t: the output is ~ N(sqrt(ab) x, 1 - ab) in [-1, 1] units.
    img = Image.new("L", (256, 256), 128)
    t = 100
    y = np.asarray(add_noise(img, t, seed=0), dtype=np.float64) / 127.5 - 1
    assert y.std() == pytest.approx(math.sqrt(1 - alpha_bar(t)), rel=0.05)


def test_annealed_timestep() -> None:
    assert annealed_timestep(0.0) == 497  # 500 * sigmoid(5) = 496.65
    assert annealed_timestep(0.5) == 250
    assert annealed_timestep(1.0) == 3  # 500 * sigmoid(-5) = 3.35
    assert annealed_timestep(0.0, t_init=100) == 99
    ts = [annealed_timestep(p / 10) for p in range(11)]
    assert all(a >= b for a, b in zip(ts, ts[1:]))
    assert annealed_timestep(1.7) == annealed_timestep(1.0)  # clamped


def test_noise_view_passes_t_and_seed() -> None:
    img = _image()
    out = VIEWS["noise"](img, {}, 4, t=300)
    assert np.array_equal(np.asarray(out), np.asarray(add_noise(img, 300, seed=4)))
