"""The DVRP recipe: a short run learns and logs the visual terms, the views are what the
method says (patch-aligned masks, annealed noise), zero visual weights give exactly the
GRPO loss, the full-vocabulary KL is exact, and resume reproduces an uninterrupted run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recipes.dvrp import (
    DVRPConfig,
    DVRPRecipe,
    DVRPRecipeConfig,
    build_triplet,
    noise_timestep,
    view_seed,
)
from vlreason.algorithms.divergence import kl_from_logits
from vlreason.config import load_config, to_dict
from vlreason.paths import warm_model
from vlreason.recipe_base import run_recipe
from vlreason.rollout.chunked import chunked_full_kl
from vlreason.train.metrics import StepTimer
from vlreason.views import PixelBudget, patch_mask_grid

REPO = Path(__file__).resolve().parents[2]
def approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-7)


FAST = ["rollout.num_generations=2", "rollout.max_new_tokens=12", "algorithm.prompts_per_step=2",
        "algorithm.micro_batch_prompts=1", "optim.lr=1e-3", "progress=false", "save_steps=0",
        "dvrp.anneal_steps=4"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_logs_visual_terms_and_resume_is_exact(tmp_path):
    straight = tmp_path / "straight"
    run_recipe(DVRPRecipe, None, [f"output_dir={straight}", "max_steps=4", *FAST])
    records = _metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("reward", "loss", "kl_mask", "kl_noise", "entropy_mask", "entropy_noise", "noise_t",
                "mask_ratio", "loss/grpo", "loss/dvrp", "time/rollout", "time/reward", "time/views",
                "time/update"):
        assert key in records[-1], key
    for r in records:
        assert math.isfinite(r["loss"])
        assert r["kl_mask"] > 0, "masked view gave the same distribution as the original"
        assert r["noise_t"] == round(500 / (1 + math.exp(-10 * (0.5 - (r["step"] - 1) / 4))))
        assert 0.3 < r["mask_ratio"] < 0.9
        assert r["loss"] == approx(r["loss/grpo"] + r["loss/dvrp"])
    assert [r["noise_t"] for r in records] == [497, 462, 250, 38]
    base = load_file(str(warm_model() / "model.safetensors"))
    final = load_file(str(straight / "final" / "model.safetensors"))
    unchanged = [n for n in base if torch.equal(final[n], base[n])]
    assert not unchanged, f"trainable tensors that did not change: {unchanged}"

    # 2 steps, then resume=auto to 4: same weights as the straight run
    run = tmp_path / "resumed"
    run_recipe(DVRPRecipe, None, [f"output_dir={run}", "max_steps=2", *FAST])
    run_recipe(DVRPRecipe, None, [f"output_dir={run}", "max_steps=4", "resume=auto", *FAST])
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    resumed = load_file(str(run / "final" / "model.safetensors"))
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], atol=1e-6, rtol=1e-5, msg=name)
    assert [r["reward"] for r in _metrics(run)] == [r["reward"] for r in records]
    assert [r["kl_mask"] for r in _metrics(run)] == approx([r["kl_mask"] for r in records])


def test_triplet_masks_whole_patches_with_probability_p():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(1, 256, (300, 420, 3), dtype=np.uint8))  # no black pixels
    budget = PixelBudget(min_pixels=56 * 56, max_pixels=448 * 448, factor=28)
    kwargs = dict(budget=budget, patch_size=14, mask_prob=0.6, noise_t=250, seed=3, step=5, row_index=1)
    t = build_triplet([img], **kwargs)
    orig, masked, noised = t.original[0], t.masked[0], t.noised[0]
    assert orig.size == masked.size == noised.size == budget.resize(img).size
    w, h = orig.size
    assert w % 28 == 0 and h % 28 == 0
    grid = patch_mask_grid(h // 14, w // 14, 0.6, view_seed(3, 5, 0, 1, 0, 1))
    m = np.asarray(masked).reshape(h // 14, 14, w // 14, 14, 3)
    o = np.asarray(orig).reshape(h // 14, 14, w // 14, 14, 3)
    black = (m == 0).all(axis=(1, 3, 4))
    kept = (m == o).all(axis=(1, 3, 4))
    assert np.array_equal(black, grid) and np.array_equal(kept, ~grid)  # whole patches, on the grid
    assert abs(grid.mean() - 0.6) < 0.05 and grid.size > 500
    assert t.masked_patches == grid.sum() and t.total_patches == grid.size
    assert not np.array_equal(np.asarray(noised), np.asarray(orig))
    again = build_triplet([img], **kwargs)  # deterministic per (seed, step, row)
    assert np.array_equal(np.asarray(again.masked[0]), np.asarray(masked))
    assert np.array_equal(np.asarray(again.noised[0]), np.asarray(noised))
    other = build_triplet([img], **{**kwargs, "step": 6})
    assert not np.array_equal(np.asarray(other.masked[0]), np.asarray(masked))
    cfg = DVRPConfig()
    assert [noise_timestep(s, cfg, 100) for s in (0, 50, 100)] == [497, 250, 3]


def test_chunked_full_kl_is_exact_with_gradients():
    torch.manual_seed(0)
    hp, hq, w = torch.randn(7, 5, requires_grad=True), torch.randn(7, 5, requires_grad=True), torch.randn(11, 5, requires_grad=True)
    got = chunked_full_kl(hp, hq, w, chunk_size=3)
    got.sum().backward()
    grads = [x.grad.clone() for x in (hp, hq, w)]
    for x in (hp, hq, w):
        x.grad = None
    ref = kl_from_logits(hp @ w.T, hq @ w.T)
    ref.sum().backward()
    torch.testing.assert_close(got, ref)
    for g, x in zip(grads, (hp, hq, w)):
        torch.testing.assert_close(g, x.grad)


def test_zero_visual_weights_give_the_grpo_loss_and_full_divergence_runs(tmp_path):
    cfg = load_config(DVRPRecipeConfig, None, [f"output_dir={tmp_path}", *FAST, "dvrp.lambda_nec=0",
                                               "dvrp.lambda_rob=0", "dvrp.lambda_ent=0"])
    cfg.model.name_or_path = str(DVRPRecipe.default_model())
    recipe = DVRPRecipe(cfg)
    recipe.setup()
    micro, metrics = recipe.prepare(0, StepTimer())
    assert len(micro) == 2 and metrics["noise_t"] == 497
    for batch in micro:
        loss, m = recipe.step(batch)
        plain, _ = recipe.phases.loss(batch)
        torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-7)
        assert m["kl_mask"] > 0 and m["entropy_mask"] > 0

    recipe.cfg.dvrp = DVRPConfig(divergence="full")
    loss_full, m_full = recipe.step(micro[0])
    recipe.cfg.dvrp = DVRPConfig(divergence="sampled")
    loss_sampled, m_sampled = recipe.step(micro[0])
    assert math.isfinite(float(loss_full.detach())) and m_full["kl_mask"] > 0 and m_full["kl_noise"] >= 0
    assert m_full["entropy_mask"] == approx(m_sampled["entropy_mask"])
    plain0, _ = recipe.phases.loss(micro[0])
    assert float(loss_sampled.detach()) != approx(float(plain0.detach()))  # the visual terms do enter the loss
    assert float(loss_sampled.detach()) == approx(m_sampled["loss/grpo"] / 2 + m_sampled["loss/dvrp"] / 2)
    loss_full.backward()  # gradient through all three views, pi_orig included
    head = recipe.policy.family.lm_head(recipe.model).weight
    assert head.grad is not None and torch.isfinite(head.grad).all()
    recipe.cleanup()


def test_shipped_config_is_the_default():
    cfg = load_config(DVRPRecipeConfig, REPO / "recipes" / "configs" / "dvrp.yaml")
    assert to_dict(cfg) == to_dict(load_config(DVRPRecipeConfig))
    d = cfg.dvrp
    assert (d.mask_prob, d.t_init, d.gamma, d.lambda_nec, d.lambda_rob, d.lambda_ent, cfg.algorithm.kl_coef) == (
        0.6, 500, 10.0, 0.01, 0.01, 0.05, 0.0)
