"""The DVRP recipe: a short run learns and logs the visual terms, the views are what the
method says (patch-aligned masks, annealed noise), zero visual weights give exactly the
GRPO loss, the full-vocabulary KL is exact, and resume reproduces an uninterrupted run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes.dvrp import DVRPConfig, DVRPRecipe, DVRPRecipeConfig
from vlreason.algorithms.divergence import kl_from_logits
from vlreason.config import load_config, to_dict
from vlreason.paths import warm_model
from vlreason.recipe_base import run_recipe
from vlreason.rollout.chunked import chunked_full_kl
from vlreason.rollout.forward import pixel_rows
from vlreason.rollout.views_forward import view_token_terms
from vlreason.train.metrics import StepTimer
from vlreason.views.noise import noise_pixel_values
from vlreason.views.triplet import NOISE_VIEW, view_seed

REPO = Path(__file__).resolve().parents[2]
def approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-7)


FAST = ["rollout.num_generations=2", "rollout.max_new_tokens=12", "prompts_per_step=2",
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
    _check_noised_view(recipe, micro[0].prompts, micro[0].extras["noised_prompts"], t=497)
    for batch in micro:
        loss, m = recipe.step(batch)
        plain, _ = recipe.phases.loss(batch)
        torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-7)
        assert m["kl_mask"] > 0 and m["entropy_mask"] > 0

    recipe.cfg.dvrp = DVRPConfig(kl_method="full")
    loss_full, m_full = recipe.step(micro[0])
    recipe.cfg.dvrp = DVRPConfig(kl_method="sampled")
    loss_sampled, m_sampled = recipe.step(micro[0])
    assert math.isfinite(float(loss_full.detach())) and m_full["kl_mask"] > 0 and m_full["kl_noise"] >= 0
    assert m_full["entropy_mask"] == approx(m_sampled["entropy_mask"])
    plain0, _ = recipe.phases.loss(micro[0])
    assert float(loss_sampled.detach()) != approx(float(plain0.detach()))  # the visual terms do enter the loss
    assert float(loss_sampled.detach()) == approx(m_sampled["loss/grpo"] / 2 + m_sampled["loss/dvrp"] / 2)
    loss_full.backward()  # gradient through all three views, pi_orig included
    head = recipe.policy.family.lm_head(recipe.model).weight
    assert head.grad is not None and torch.isfinite(head.grad).all()
    # sampled mode: detach_orig only removes pi_orig's (score-function) gradient, never the value
    views = {name: micro[0].extras[f"{name}_prompts"] for name in ("masked", "noised")}
    kl, grad = {}, {}
    for detach in (False, True):
        recipe.model.zero_grad(set_to_none=True)
        terms = view_token_terms(recipe.model, recipe.policy.family, micro[0], views, kl_method="sampled",
                                 detach_orig=detach, temperature=recipe.policy.sampling_temperature)
        terms.kl_NT["masked"].sum().backward()
        kl[detach], grad[detach] = terms.kl_NT["masked"].detach(), head.grad.clone()
    torch.testing.assert_close(kl[False], kl[True])
    assert not torch.allclose(grad[False], grad[True])
    recipe.cleanup()


def _check_noised_view(recipe, prompts, noised, t):
    """The noised view is the rollout's own pixel tensor, noised in float per image with
    its (seed, step, rank, row, image) seed: same tokens, values off the 8-bit grid."""
    assert torch.equal(noised.input_ids_PT, prompts.input_ids_PT)
    assert torch.equal(noised.image_grid_thw, prompts.image_grid_thw)
    ip = recipe.policy.processor.image_processor
    parts = torch.split(prompts.pixel_values, pixel_rows(prompts.image_grid_thw))
    image = 0
    for row, count in enumerate(prompts.images_per_prompt):
        for j in range(count):
            expected = noise_pixel_values(parts[image], t, image_mean=tuple(ip.image_mean),
                                          image_std=tuple(ip.image_std), seed=view_seed(0, 0, 0, row, j, NOISE_VIEW))
            got = torch.split(noised.pixel_values, pixel_rows(prompts.image_grid_thw))[image]
            assert torch.equal(got, expected)
            image += 1
    mean = torch.tensor(ip.image_mean).repeat_interleave(2 * 14 * 14)
    std = torch.tensor(ip.image_std).repeat_interleave(2 * 14 * 14)
    pixels = noised.pixel_values * std + mean
    assert ((pixels < 0) | (pixels > 1)).float().mean() > 0.2  # not clipped to the pixel range
    assert ((pixels * 255 - (pixels * 255).round()).abs() < 1e-3).float().mean() < 0.01  # not 8-bit


def test_shipped_config_is_the_default():
    cfg = load_config(DVRPRecipeConfig, REPO / "recipes" / "configs" / "dvrp.yaml")
    assert to_dict(cfg) == to_dict(load_config(DVRPRecipeConfig))
    d = cfg.dvrp
    assert (d.mask_prob, d.t_init, d.gamma, d.lambda_nec, d.lambda_rob, d.lambda_ent, cfg.algorithm.kl_coef) == (
        0.6, 500, 10.0, 0.01, 0.01, 0.05, 0.0)


def test_medical_preset_differs_only_in_the_medical_values():
    medical = to_dict(load_config(DVRPRecipeConfig, REPO / "recipes" / "configs" / "dvrp_medical.yaml"))
    general = to_dict(load_config(DVRPRecipeConfig, REPO / "recipes" / "configs" / "dvrp.yaml"))
    assert (medical["dvrp"]["mask_prob"], medical["dvrp"]["t_init"]) == (0.2, 100)
    medical["dvrp"].update(mask_prob=0.6, t_init=500)
    medical["output_dir"] = general["output_dir"]
    assert medical == general


def test_dr_grpo_constant_of_the_visual_terms_is_the_rollouts_length_limit(tmp_path):
    """With seq-mean-token-sum-norm the visual terms divide by the same constant as the
    GRPO term: the length limit the rollout was sampled with (``phases.max_tokens``, a
    PTST stage's when one is set), not ``rollout.max_new_tokens`` read on its own."""
    cfg = load_config(DVRPRecipeConfig, None, [f"output_dir={tmp_path}", *FAST,
                                               "algorithm.aggregation=seq-mean-token-sum-norm"])
    cfg.model.name_or_path = str(DVRPRecipe.default_model())
    recipe = DVRPRecipe(cfg)
    recipe.setup()
    micro, _ = recipe.prepare(0, StepTimer())
    assert recipe.phases.max_tokens == 12
    with torch.no_grad():
        _, m12 = recipe.step(micro[0])
        recipe.phases.max_tokens = 24  # as if the rollout had been sampled with a 24-token limit
        _, m24 = recipe.step(micro[0])
    assert m24["loss/dvrp"] == approx(m12["loss/dvrp"] / 2)
    assert m24["loss/grpo"] == approx(m12["loss/grpo"] / 2)
    recipe.cleanup()


def test_paper_config_carries_the_papers_numbers_and_a_source_on_every_value():
    path = REPO / "recipes" / "configs" / "dvrp_paper.yaml"
    cfg = load_config(DVRPRecipeConfig, path)
    d = cfg.dvrp
    assert (d.mask_prob, d.t_init, d.gamma, d.num_noise_steps, d.kl_method) == (0.6, 500, 10.0, 1000, "full")
    assert (d.lambda_nec, d.lambda_rob, d.lambda_ent, cfg.algorithm.kl_coef) == (0.01, 0.01, 0.05, 0.0)
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    for line in path.read_text().splitlines():  # every number and switch names its source
        value = line.split("#")[0].partition(":")[2].strip()
        if value in ("true", "false") or value.replace(".", "").replace("e-", "").isdigit():
            assert "[" in line.partition("#")[2], f"no source: {line}"
