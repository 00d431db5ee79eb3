"""DVRP, "Thinking with Deltas" (arXiv 2601.06801): GRPO + differential visual terms.

    vlreason train dvrp [--config FILE] [key=value ...]
    python recipes/dvrp.py [--config FILE] [key=value ...]

With no config it trains the warm tiny offline model on the bundled synthetic demo
data for a short CPU run. Shape as recipes/grpo.py: ``setup()``, ``train()``,
``cleanup()`` and the loop interface; GRPO's rollout / reward / advantages come from
vlreason.train.grpo, the maths from vlreason.algorithms, the views from vlreason.views.

Per step (METHODS.md, DVRP):

1. GRPO rollout from the ORIGINAL image only (``GRPOPhases.prepare``).
2. Each prompt image gives a triplet (:func:`build_triplet`): the original, resized to
   the policy's pixel budget; a masked view (the family's patches, 14 px on
   Qwen2/2.5-VL, blacked out independently with probability ``dvrp.mask_prob``); a
   perturbed view (diffusion noise at step ``t = T_init * sigmoid(gamma * (0.5 -
   progress))``, ``progress = step / anneal_steps`` with the 0-based step index, so the
   first step has progress 0). Views are made after resizing, so the masked squares are
   the vision tower's patches and all three views have the same number of image tokens
   (hence identical prompt token ids). Masks and noise are seeded from (seed, step,
   rank, row index, image index, view), never from a running RNG: resume is exact.
3. The same completion tokens are scored under the three images (one forward each,
   each image encoded once per micro-batch) and the loss is ``-J``:

       loss = L_GRPO - l_nec KL(pi_orig || pi_mask) + l_rob KL(pi_orig || pi_noise)
              + l_ent [H(pi_mask) + H(pi_noise)]

   (``dvrp_regularizer``; same aggregation and global-count normalisation as the GRPO
   term, so micro-batch losses add up to the step's loss). No reference KL by default.

Divergence estimators (``dvrp.divergence``):

* ``sampled`` (default, cheap): ``sampled_token_kl`` (k3 by default) on the log-probs of
  the sampled tokens; unbiased for KL(pi_orig || .) since rollouts come from pi_orig.
* ``full``: the exact full-vocabulary token KL (not a top-k approximation), from the
  last hidden states of the two views through the LM head, ``dvrp.chunk_size`` positions
  at a time; each chunk runs under activation checkpointing, so only the hidden states
  are kept for backward and at most one chunk's ``[chunk, V]`` logits of each view
  exist at a time (recomputed in backward).

All distributions (GRPO ratio, KL, entropies) are taken at the sampling temperature,
the distribution the completions were drawn from.

Gradients: all three views get gradient. pi_orig is NOT detached in the KL terms by
default (``dvrp.detach_orig=false``): the paper writes the KL terms as part of J with no
stop-gradient, so both sides are trained; ``detach_orig=true`` treats pi_orig as a fixed
target instead. The entropies are differentiable (``chunked_entropy(with_grad=True)``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlreason.algorithms.divergence import dvrp_regularizer, sampled_token_kl
from vlreason.algorithms.kl import KL_ESTIMATORS
from vlreason.config import doc
from vlreason.data.stream import RowStream
from vlreason.models.loading import ModelConfig
from vlreason.models.policy import RolloutConfig
from vlreason.paths import warm_model
from vlreason.recipe_base import DataConfig, Recipe, load_policy, load_split, run_recipe_cli
from vlreason.registry import register_recipe
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.chunked import chunked_entropy, chunked_full_kl, gather_logprobs
from vlreason.rollout.forward import completion_hidden_states
from vlreason.rollout.prompts import decode_row_images
from vlreason.train.distributed import world
from vlreason.train.grpo import GRPOConfig, GRPOPhases
from vlreason.train.loop import LoopConfig, OptimConfig, Trainer
from vlreason.train.metrics import StepTimer
from vlreason.views import PixelBudget, add_noise, annealed_timestep, patch_mask, patch_mask_grid
from vlreason.views.noise import NUM_STEPS

DIVERGENCE_KINDS = ("sampled", "full")


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
    divergence: str = doc("sampled (sampled-token estimate, cheap) | full (exact full-vocabulary "
                          "token KL, chunked).", "sampled")
    kl_estimator: str = doc("Estimator for divergence=sampled: k1 | k2 | k3.", "k3")
    chunk_size: int = doc("Positions per chunk for divergence=full (0: rollout.logprob_chunk_size); "
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
        if self.divergence not in DIVERGENCE_KINDS:
            raise ValueError(f"dvrp.divergence must be one of {list(DIVERGENCE_KINDS)}, got '{self.divergence}'")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"dvrp.kl_estimator must be one of {list(KL_ESTIMATORS)}")


@dataclass
class DVRPRecipeConfig(LoopConfig):
    output_dir: str = doc("Run directory.", "runs/dvrp")
    max_steps: int = doc("Optimizer steps to run.", 40)
    save_steps: int = doc("Checkpoint every N steps (0: only on stop and at the end).", 20)
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Policy model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Datasets."})
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(num_generations=4, max_new_tokens=32),
        metadata={"help": "Sampling and images."},
    )
    algorithm: GRPOConfig = field(
        default_factory=lambda: GRPOConfig(prompts_per_step=4, micro_batch_prompts=2),
        metadata={"help": "GRPO settings (kl_coef 0: DVRP uses no reference KL)."},
    )
    dvrp: DVRPConfig = field(default_factory=DVRPConfig, metadata={"help": "DVRP views and visual terms."})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4), metadata={"help": "Optimizer and schedule."})


# ---- views ---------------------------------------------------------------------------
def noise_timestep(step: int, cfg: DVRPConfig, max_steps: int) -> int:
    """The perturbed view's timestep at 0-based ``step``: annealed over ``anneal_steps``."""
    horizon = cfg.anneal_steps or max_steps
    return annealed_timestep(step / max(horizon, 1), t_init=cfg.t_init, gamma=cfg.gamma)


def view_seed(seed: int, step: int, rank: int, row_index: int, image_index: int, view: int) -> int:
    """A seed for one view of one image, a pure function of its coordinates (resume-exact)."""
    return int(np.random.SeedSequence([seed, step, rank, row_index, image_index, view]).generate_state(1)[0])


@dataclass
class Triplet:
    original: list[Image.Image]  # resized to the budget: what the rollout saw
    masked: list[Image.Image]
    noised: list[Image.Image]
    masked_patches: int = 0
    total_patches: int = 0


def build_triplet(images: list[Image.Image], *, budget: PixelBudget, patch_size: int, mask_prob: float,
                  noise_t: int, num_noise_steps: int = NUM_STEPS, seed: int = 0, step: int = 0,
                  rank: int = 0, row_index: int = 0) -> Triplet:
    """DVRP's (original, masked, perturbed) images of one row at ``step``.

    Every image is first resized to ``budget`` (sides are multiples of the family's
    ``factor``, hence of ``patch_size``), then masked / noised, so the masked squares
    are exactly the vision tower's patches and no view changes the image-token count.
    """
    out = Triplet([], [], [])
    for i, img in enumerate(images):
        base = budget.resize(img.convert("RGB"))
        masked = patch_mask(base, mask_prob, patch_size=patch_size,
                            seed=view_seed(seed, step, rank, row_index, i, 1))
        noised = add_noise(base, noise_t, seed=view_seed(seed, step, rank, row_index, i, 2),
                           num_steps=num_noise_steps)
        w, h = base.size
        grid = patch_mask_grid(math.ceil(h / patch_size), math.ceil(w / patch_size), mask_prob,
                               view_seed(seed, step, rank, row_index, i, 1))  # the draw patch_mask made
        out.masked_patches += int(grid.sum())
        out.total_patches += grid.size
        out.original.append(base)
        out.masked.append(masked)
        out.noised.append(noised)
    return out


@register_recipe("dvrp")
class DVRPRecipe(Recipe):
    config_class = DVRPRecipeConfig

    @staticmethod
    def default_model() -> Path:
        """The bundled warm tiny checkpoint: RL needs a model that can already see."""
        return warm_model()

    def setup(self) -> None:
        cfg = self.cfg
        self.policy = load_policy(cfg, with_reference=cfg.algorithm.kl_coef > 0)
        self.model = self.policy.model
        self.train_data = load_split(cfg.data.train, "train")
        self.row_index = {str(i): k for k, i in enumerate(self.train_data["id"])}
        self.stream = RowStream(self.train_data, seed=cfg.seed)
        self.phases = GRPOPhases(cfg.algorithm, self.policy, self.stream, cfg.seed)
        self.trainer = Trainer(cfg, self, full_config=cfg, save_final=self.policy.save_pretrained)

    # ---- views of a step -----------------------------------------------------------------
    def triplet(self, row: dict[str, Any], step: int, row_index: int = 0) -> Triplet:
        """The triplet this recipe feeds for ``row`` (with its image bytes) at 0-based ``step``."""
        d = self.cfg.dvrp
        return build_triplet(
            decode_row_images(row), budget=self.policy.budget, patch_size=self.policy.family.patch_size,
            mask_prob=d.mask_prob, noise_t=noise_timestep(step, d, self.cfg.max_steps),
            num_noise_steps=d.num_noise_steps, seed=self.cfg.seed, step=step, rank=world()[0],
            row_index=row_index,
        )

    def view_prompts(self, prompts: PromptBatch, step: int) -> tuple[PromptBatch, PromptBatch, dict[str, float]]:
        rows = [self.train_data[self.row_index[str(r["id"])]] for r in prompts.rows]
        triplets = [self.triplet(row, step, k) for k, row in enumerate(rows)]
        masked = self.policy.prompts(rows, images=[t.masked for t in triplets])
        noised = self.policy.prompts(rows, images=[t.noised for t in triplets])
        for name, view in (("masked", masked), ("noised", noised)):
            if not (torch.equal(view.input_ids_PT, prompts.input_ids_PT)
                    and torch.equal(view.attention_mask_PT, prompts.attention_mask_PT)):
                raise RuntimeError(f"step {step + 1}: the {name} view changed the prompt tokens "
                                   "(image-token count); views must keep the budget's image size")
        total = sum(t.total_patches for t in triplets)
        metrics = {
            "noise_t": float(noise_timestep(step, self.cfg.dvrp, self.cfg.max_steps)),
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

    def _hidden(self, batch: RolloutBatch) -> torch.Tensor:
        """Temperature-scaled last hidden states [M, H] of the completion tokens."""
        hidden = completion_hidden_states(self.model, self.policy.family, batch)
        h_MH = hidden[batch.completion_mask_NT.bool().to(hidden.device)]
        tau = self.policy.sampling_temperature
        return h_MH / tau if tau != 1.0 else h_MH

    def step(self, micro_batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        d = self.cfg.dvrp
        batch = micro_batch
        views = {name: replace(batch, prompts=batch.extras[f"{name}_prompts"]) for name in ("masked", "noised")}
        weight = self.policy.family.lm_head(self.model).weight
        chunk = self.policy.rollout.logprob_chunk_size
        h_orig = self._hidden(batch)
        mask_NT = batch.completion_mask_NT.bool().to(h_orig.device)
        ids_M = batch.completion_ids_NT.to(h_orig.device)[mask_NT]

        def scatter(values_M: torch.Tensor) -> torch.Tensor:
            out = values_M.new_zeros(mask_NT.shape)
            out[mask_NT] = values_M
            return out

        logp_orig_M = gather_logprobs(h_orig, weight, ids_M, chunk_size=chunk)
        loss, metrics = self.phases.loss_from_logprobs(scatter(logp_orig_M), batch)
        h_p = h_orig.detach() if d.detach_orig else h_orig
        kl, ent = {}, {}
        for name, view in views.items():
            h_view = self._hidden(view)
            ent[name] = scatter(chunked_entropy(h_view, weight, chunk_size=chunk, with_grad=True))
            if d.divergence == "full":
                kl[name] = scatter(chunked_full_kl(h_p, h_view, weight, chunk_size=d.chunk_size or chunk))
            else:
                logp_p = logp_orig_M.detach() if d.detach_orig else logp_orig_M
                logp_view = gather_logprobs(h_view, weight, ids_M, chunk_size=chunk)
                kl[name] = scatter(sampled_token_kl(logp_p, logp_view, d.kl_estimator))
        reg, reg_metrics = dvrp_regularizer(
            kl["masked"], kl["noised"], ent["masked"], ent["noised"], mask_NT,
            lambda_nec=d.lambda_nec, lambda_rob=d.lambda_rob, lambda_ent=d.lambda_ent,
            agg_mode=self.cfg.algorithm.aggregation, max_tokens=self.policy.rollout.max_new_tokens,
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
