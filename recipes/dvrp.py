"""DVRP, "Thinking with Deltas" (arXiv 2601.06801): GRPO + differential visual terms.

    vlreason train dvrp [--config FILE] [key=value ...]
    python recipes/dvrp.py [--config FILE] [key=value ...]

With no config it trains the warm tiny offline model on the bundled synthetic demo
data for a short CPU run. Shape as recipes/grpo.py: ``setup()``, ``train()``,
``cleanup()`` and the loop interface; GRPO's rollout / reward / advantages come from
vlreason.train.grpo, the maths from vlreason.algorithms, the views from vlreason.views.

Per step (METHODS.md, DVRP):

1. GRPO rollout from the ORIGINAL image only (``GRPOPhases.prepare``).
2. Views (:mod:`vlreason.views.triplet`, :func:`vlreason.rollout.views_forward.noised_prompts`):
   the original, resized to the policy's pixel budget; a masked view (the family's
   patches, 14 px on Qwen2/2.5-VL, blacked out independently with probability
   ``dvrp.mask_prob``); a perturbed view: diffusion noise at step ``t = T_init *
   sigmoid(gamma * (0.5 - progress))``, ``progress = step / anneal_steps`` with the 0-based
   step index, applied in float to the processor's normalised ``pixel_values`` of the
   original (no clipping back to 8-bit pixels). Views keep the image size, so all three
   have the same image tokens (hence identical prompt token ids). Masks and noise are
   seeded from (seed, step, rank, row index, image index, view), never from a running
   RNG: resume is exact.
3. The same completion tokens are scored under the three images
   (:func:`vlreason.rollout.views_forward.view_token_terms`: one forward each, each image
   encoded once per micro-batch) and the loss is ``-J``:

       loss = L_GRPO - l_nec KL(pi_orig || pi_mask) + l_rob KL(pi_orig || pi_noise)
              + l_ent [H(pi_mask) + H(pi_noise)]

   (``dvrp_regularizer``; same aggregation and global-count normalisation as the GRPO
   term, so micro-batch losses add up to the step's loss). No reference KL by default.

Divergence (``dvrp.kl_method``):

* ``full`` (default, the paper's): the exact full-vocabulary token KL from the last
  hidden states of the two views through the LM head, ``dvrp.chunk_size`` positions at a
  time under activation checkpointing (at most one chunk's ``[chunk, V]`` logits of each
  view exist at a time). Exact value and exact gradient on both sides. Cost: the two
  KL terms take 16 LM-head-sized matmuls per completion token (forward, recompute,
  two gradients, for both views) instead of the sampled mode's 8, plus elementwise
  passes over ``[chunk, V]``: a few percent of a 7B model's update, about 2x the tiny
  CPU demo's update (docs/dvrp.md).
* ``sampled`` (cheap): ``sampled_token_kl`` (k3 by default) on the log-probs of the
  sampled tokens. Its value is unbiased for KL(pi_orig || .) since rollouts come from
  pi_orig; pi_orig gets the score-function gradient ``stopgrad(log pi_orig - log
  pi_view) grad log pi_orig``, so the expected gradient is the exact KL's on both sides
  (k1 / k3; before this fix the k3 pathwise gradient on pi_orig was that of
  KL(pi_view || pi_orig)). Noisier than ``full``.

All distributions (GRPO ratio, KL, entropies) are taken at the sampling temperature,
the distribution the completions were drawn from.

Gradients: all three views get gradient. pi_orig is NOT detached in the KL terms by
default (``dvrp.detach_orig=false``): the paper writes the KL terms as part of J with no
stop-gradient, so both sides are trained; ``detach_orig=true`` treats pi_orig as a fixed
target instead. The entropies are differentiable (``chunked_entropy(with_grad=True)``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vlreason.algorithms.divergence import dvrp_regularizer
from vlreason.algorithms.kl import KL_ESTIMATORS
from vlreason.config import doc
from vlreason.data.stream import RowStream
from vlreason.recipe_base import Recipe, RunConfig, load_split, run_recipe_cli
from vlreason.registry import register_recipe
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.policy import RolloutConfig
from vlreason.rollout.prompts import decode_row_images
from vlreason.rollout.views_forward import KL_METHODS, noised_prompts, view_token_terms
from vlreason.train.distributed import world
from vlreason.train.grpo import GRPOConfig, GRPOPhases
from vlreason.train.loop import OptimConfig, Trainer
from vlreason.train.metrics import StepTimer
from vlreason.views.noise import NUM_STEPS
from vlreason.views.triplet import Triplet, build_triplet, noise_timestep


@dataclass
class DVRPConfig:
    mask_prob: float = doc("Probability that a patch is blacked out in the masked view (paper: 0.6; "
                           "0.2 for medical images).", 0.6)
    t_init: int = doc("Initial noise timestep T_init of the perturbed view (paper: 500; medical 100).", 500)
    gamma: float = doc("Steepness of the sigmoid annealing of the noise timestep.", 10.0)
    num_noise_steps: int = doc("Length of the diffusion noise schedule (DDPM linear betas).", NUM_STEPS)
    anneal_steps: int = doc("Steps over which the noise anneals (progress = step / anneal_steps); "
                            "0: max_steps. Set it explicitly when a run is extended by resuming "
                            "with a larger max_steps.", 0)
    lambda_nec: float = doc("l_nec: weight of KL(pi_orig || pi_mask), maximised (visual necessity).", 0.01)
    lambda_rob: float = doc("l_rob: weight of KL(pi_orig || pi_noise), minimised (robustness).", 0.01)
    lambda_ent: float = doc("l_ent: weight of H(pi_mask) + H(pi_noise), minimised.", 0.05)
    kl_method: str = doc("full (exact full-vocabulary token KL, chunked; the paper's) | sampled "
                          "(sampled-token estimate with a score-function gradient on pi_orig, cheaper, "
                          "noisier).", "full")
    kl_estimator: str = doc("Estimator for kl_method=sampled: k1 | k2 | k3.", "k3")
    chunk_size: int = doc("Positions per chunk for kl_method=full (0: rollout.logprob_chunk_size); "
                          "the transient is about 4 x chunk x vocabulary floats.", 0)
    detach_orig: bool = doc("Stop the gradient through pi_orig in the two KL terms (default: both "
                            "sides get gradient, as the paper's objective reads).", False)

    def validate(self) -> None:
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"dvrp.mask_prob must be in [0, 1], got {self.mask_prob}")
        if not 0 <= self.t_init <= self.num_noise_steps:
            raise ValueError(f"dvrp.t_init must be in [0, dvrp.num_noise_steps={self.num_noise_steps}]")
        if self.num_noise_steps < 1 or self.anneal_steps < 0 or self.chunk_size < 0:
            raise ValueError("dvrp.num_noise_steps must be >= 1, anneal_steps and chunk_size >= 0")
        if self.kl_method not in KL_METHODS:
            raise ValueError(f"dvrp.kl_method must be one of {list(KL_METHODS)}, got '{self.kl_method}'")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"dvrp.kl_estimator must be one of {list(KL_ESTIMATORS)}")


@dataclass
class DVRPRecipeConfig(RunConfig):
    # shared keys (help in RunConfig), restated with this recipe's defaults
    output_dir: str = "runs/dvrp"
    max_steps: int = 40
    save_steps: int = 20
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_generations=4, max_new_tokens=32))
    prompts_per_step: int = 4
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    # DVRP's own
    algorithm: GRPOConfig = field(default_factory=lambda: GRPOConfig(micro_batch_prompts=2),
                                  metadata={"help": "GRPO settings (kl_coef 0: DVRP uses no reference KL)."})
    dvrp: DVRPConfig = field(default_factory=DVRPConfig, metadata={"help": "DVRP views and visual terms."})


@register_recipe("dvrp")
class DVRPRecipe(Recipe):
    config_class = DVRPRecipeConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.start_policy(with_reference=cfg.algorithm.kl_coef > 0)
        self.train_data = load_split(cfg.data.train, "train")
        self.row_index = {str(i): k for k, i in enumerate(self.train_data["id"])}
        self.stream = RowStream(self.train_data, seed=cfg.seed)
        self.phases = GRPOPhases(cfg.algorithm, self.policy, self.stream, cfg.seed,
                                 prompts_per_step=cfg.prompts_per_step)
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained)

    # ---- views of a step -----------------------------------------------------------------
    def noise_t(self, step: int) -> int:
        """The perturbed view's timestep at 0-based ``step`` (annealed over ``anneal_steps``)."""
        d = self.cfg.dvrp
        return noise_timestep(step, d.anneal_steps or self.cfg.max_steps, t_init=d.t_init, gamma=d.gamma)

    def triplet(self, row: dict[str, Any], step: int, row_index: int = 0) -> Triplet:
        """The views this recipe feeds for ``row`` (with its image bytes) at 0-based ``step``."""
        return build_triplet(
            decode_row_images(row), budget=self.policy.budget, patch_size=self.policy.family.patch_size,
            mask_prob=self.cfg.dvrp.mask_prob, seed=self.cfg.seed, step=step, rank=world()[0],
            row_index=row_index,
        )

    def view_prompts(self, prompts: PromptBatch, step: int) -> tuple[PromptBatch, PromptBatch, dict[str, float]]:
        rows = [self.train_data[self.row_index[str(r["id"])]] for r in prompts.rows]
        triplets = [self.triplet(row, step, k) for k, row in enumerate(rows)]
        masked = self.policy.prompts(rows, images=[t.masked for t in triplets])
        if not (torch.equal(masked.input_ids_PT, prompts.input_ids_PT)
                and torch.equal(masked.attention_mask_PT, prompts.attention_mask_PT)):
            raise RuntimeError(f"step {step + 1}: the masked view changed the prompt tokens "
                               "(image-token count); views must keep the budget's image size")
        noised = noised_prompts(prompts, self.policy.processor, self.noise_t(step),
                                [s for t in triplets for s in t.noise_seeds],
                                num_steps=self.cfg.dvrp.num_noise_steps)
        total = sum(t.total_patches for t in triplets)
        metrics = {
            "noise_t": float(self.noise_t(step)),
            "mask_ratio": sum(t.masked_patches for t in triplets) / total if total else 0.0,
        }
        return masked, noised, metrics

    # ---- the loop's recipe interface -------------------------------------------------------
    def prepare(self, step: int, timer: StepTimer) -> tuple[list[Any], dict[str, Any]]:
        micro, metrics = self.phases.prepare(step, timer)
        with timer("views"):
            masked, noised, view_metrics = self.view_prompts(micro[0].prompts, step)
        metrics.update(view_metrics)
        extras = {"masked_prompts": masked, "noised_prompts": noised, "num_micro": len(micro)}
        micro = [replace(m, extras={**m.extras, **extras}) for m in micro]
        return micro, metrics

    def step(self, micro_batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        d, batch = self.cfg.dvrp, micro_batch
        terms = view_token_terms(
            self.model, self.policy.family, batch,
            {name: batch.extras[f"{name}_prompts"] for name in ("masked", "noised")},
            kl_method=d.kl_method, estimator=d.kl_estimator, detach_orig=d.detach_orig,
            temperature=self.policy.sampling_temperature, chunk_size=self.policy.rollout.logprob_chunk_size,
            kl_chunk_size=d.chunk_size,
        )
        loss, metrics = self.phases.loss_from_logprobs(terms.logprobs_NT, batch)
        reg, reg_metrics = dvrp_regularizer(
            terms.kl_NT["masked"], terms.kl_NT["noised"], terms.entropy_NT["masked"], terms.entropy_NT["noised"],
            batch.completion_mask_NT.bool().to(terms.logprobs_NT.device),
            lambda_nec=d.lambda_nec, lambda_rob=d.lambda_rob, lambda_ent=d.lambda_ent,
            agg_mode=self.cfg.algorithm.aggregation, max_tokens=self.phases.max_tokens,
            global_count=self.phases.normaliser / world()[1],
        )
        metrics.update({k: float(v) for k, v in reg_metrics.items()})
        # the loop averages metrics over micro-batches; these parts should add up like the loss
        metrics["loss/grpo"] = float(loss.detach()) * batch.extras["num_micro"]
        metrics["loss/dvrp"] = float(reg.detach()) * batch.extras["num_micro"]
        return loss + reg, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "skipped_rows": self.phases.skipped_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "data" in state:
            self.stream.load_state_dict(state["data"])
        self.phases.skipped_rows = state.get("skipped_rows", 0)


if __name__ == "__main__":
    sys.exit(run_recipe_cli(DVRPRecipe, sys.argv[1:], name="dvrp"))
