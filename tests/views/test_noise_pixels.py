"""noise_pixel_values: DVRP's diffusion noise on the processor's normalised pixel tensor.

The oracle is the processor itself: noising the image in float (unclipped, unrounded)
and then processing it must give what noise_pixel_values computes from the processed
original, with the same eps laid out by the same processor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor

from vlreason.views.noise import alpha_bar, noise_pixel_values

PROC = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
MEAN, STD = tuple(PROC.image_mean), tuple(PROC.image_std)


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 84, 3), dtype=np.uint8))


def _process(img, **kwargs) -> torch.Tensor:
    return PROC(images=[img], do_resize=False, return_tensors="pt", **kwargs)["pixel_values"]


def _noise(pv, t, **kwargs):
    return noise_pixel_values(pv, t, image_mean=MEAN, image_std=STD, temporal_patch_size=2, **kwargs)


@pytest.mark.parametrize("t", [1, 100, 497])
def test_matches_noising_the_float_image_then_processing(t):
    img = _image()
    x = np.asarray(img, dtype=np.float64) / 255.0
    eps_img = np.random.default_rng(7).standard_normal(x.shape)
    ab = alpha_bar(t)
    y = (math.sqrt(ab) * (2 * x - 1) + math.sqrt(1 - ab) * eps_img + 1) / 2  # unclipped, in [0, 1] units
    oracle = _process(y, do_rescale=False)
    eps = _process(eps_img, do_rescale=False, do_normalize=False)
    eps_RCPP = eps.view(eps.shape[0], 3, 2, 14, 14)[:, :, 0]  # the processor's layout of eps
    got = _noise(_process(img), t, eps_RCPP=eps_RCPP)
    assert got.dtype == torch.float32 and got.shape == oracle.shape
    torch.testing.assert_close(got, oracle.to(got.dtype), atol=2e-5, rtol=1e-5)


def test_t0_is_the_identity_and_the_seed_decides():
    pv = _process(_image())
    torch.testing.assert_close(_noise(pv, 0), pv, atol=1e-6, rtol=0)
    a, b, c = _noise(pv, 200, seed=1), _noise(pv, 200, seed=1), _noise(pv, 200, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_not_clipped_or_quantized_and_shared_across_temporal_copies():
    pv = _process(_image(1))
    t = 497
    out = _noise(pv, t, seed=3)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1, 1)
    pixels = (out.view(-1, 3, 2, 14, 14) * std + mean).double()  # back to [0, 1] pixel units
    outside = ((pixels < 0) | (pixels > 1)).double().mean().item()
    assert outside > 0.25, outside  # kept, not clipped to [0, 1]
    on_grid = ((pixels * 255 - (pixels * 255).round()).abs() < 1e-3).double().mean().item()
    assert on_grid < 0.01, on_grid  # not rounded to 8-bit levels
    assert torch.equal(pixels[:, :, 0], pixels[:, :, 1])  # one eps per pixel, not per copy
    # the noise part has the schedule's variance, in [-1, 1] units
    ab = alpha_bar(t)
    x = (pv.view(-1, 3, 2, 14, 14) * std + mean).double()
    noise = 2 * (pixels - math.sqrt(ab) * x) - (1 - math.sqrt(ab))
    assert noise.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.03)
    assert abs(noise.mean().item()) < 0.03


def test_rejects_a_layout_it_does_not_know():
    pv = _process(_image())
    with pytest.raises(ValueError, match="not"):
        noise_pixel_values(pv[:, :-1], 10, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="eps"):
        _noise(pv, 10, eps_RCPP=np.zeros((1, 3, 14, 14)))
