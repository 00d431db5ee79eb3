"""Forward passes over the same completions under other image views (DVRP).

The completions were sampled from the original image; here they are re-scored with the
prompt's images swapped for views (masked, noised) while the text tokens stay the same.
Each view is one forward (each image encoded once per micro-batch, as in
:mod:`vlreason.rollout.forward`); the per-token terms come from the last hidden states
through the LM head in chunks, so no ``[batch, sequence, vocab]`` float32 tensor exists.

All distributions are taken at ``temperature`` (the sampling temperature): the LM head
has no bias, so the hidden states are divided by it instead of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vlreason.algorithms.divergence import sampled_token_kl
from vlreason.models.families import Family
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.chunked import chunked_full_kl, gather_logprobs
from vlreason.rollout.chunked_entropy import chunked_entropy
from vlreason.rollout.forward import completion_hidden_states, pixel_rows
from vlreason.views.noise import NUM_STEPS, noise_pixel_values

KL_METHODS = ("full", "sampled")


def noised_prompts(prompts: PromptBatch, processor, t: int, seeds: list[int], *,
                   num_steps: int = NUM_STEPS) -> PromptBatch:
    """``prompts`` with every image's ``pixel_values`` rows noised at timestep ``t``.

    The noise is applied to the processor's normalised float tensor
    (:func:`~vlreason.views.noise.noise_pixel_values`, no clipping or 8-bit rounding),
    image ``k`` (in ``pixel_values`` order) with ``seeds[k]``; the processor's
    ``image_mean`` / ``image_std`` / ``temporal_patch_size`` give the layout. Token ids
    and grids are unchanged.
    """
    if prompts.pixel_values is None:
        return prompts
    rows = pixel_rows(prompts.image_grid_thw)
    if len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} noise seeds for {len(rows)} images")
    ip = processor.image_processor
    parts = torch.split(prompts.pixel_values, rows)
    noised = [
        noise_pixel_values(part, t, image_mean=tuple(ip.image_mean), image_std=tuple(ip.image_std),
                           temporal_patch_size=ip.temporal_patch_size, seed=seed, num_steps=num_steps)
        for part, seed in zip(parts, seeds)
    ]
    return replace(prompts, pixel_values=torch.cat(noised) if noised else prompts.pixel_values)


def scaled_hidden(model, family: Family, batch: RolloutBatch, temperature: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h_MH / temperature, mask_NT)``: last hidden states of the M completion tokens."""
    hidden = completion_hidden_states(model, family, batch)
    mask_NT = batch.completion_mask_NT.bool().to(hidden.device)
    h_MH = hidden[mask_NT]
    return (h_MH / temperature if temperature != 1.0 else h_MH), mask_NT


def scatter_tokens(values_M: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """Per-token values of the masked positions back to ``[N, T]`` (0 elsewhere)."""
    out = values_M.new_zeros(mask_NT.shape)
    out[mask_NT] = values_M
    return out


@dataclass
class ViewTerms:
    """Per-token terms of one micro-batch, ``[N, T]`` (0 on padding)."""

    logprobs_NT: torch.Tensor  # log pi_orig of the sampled tokens (with gradient)
    kl_NT: dict[str, torch.Tensor]  # view name -> KL(pi_orig || pi_view)
    entropy_NT: dict[str, torch.Tensor]  # view name -> H(pi_view), differentiable


def view_token_terms(model, family: Family, batch: RolloutBatch, views: dict[str, PromptBatch], *,
                     kl_method: str = "full", estimator: str = "k3", detach_orig: bool = False,
                     temperature: float = 1.0, chunk_size: int = 256, kl_chunk_size: int = 0) -> ViewTerms:
    """Log-probs under the original image, KL(pi_orig || pi_view) and H(pi_view) per view.

    ``kl_method="full"``: the exact full-vocabulary KL (:func:`chunked_full_kl`,
    ``kl_chunk_size`` positions at a time, activation-checkpointed). ``"sampled"``:
    :func:`~vlreason.algorithms.divergence.sampled_token_kl` on the sampled tokens
    (``estimator``), whose gradient on pi_orig is the score-function term, so both sides
    get the exact KL's gradient in expectation (k1 / k3). ``detach_orig``: no gradient
    to pi_orig through the KL terms in either mode.
    """
    if kl_method not in KL_METHODS:
        raise ValueError(f"kl_method must be one of {list(KL_METHODS)}, got {kl_method!r}")
    weight = family.lm_head(model).weight
    h_orig, mask_NT = scaled_hidden(model, family, batch, temperature)
    ids_M = batch.completion_ids_NT.to(h_orig.device)[mask_NT]
    logp_orig_M = gather_logprobs(h_orig, weight, ids_M, chunk_size=chunk_size)
    h_p = h_orig.detach() if detach_orig else h_orig
    kl, ent = {}, {}
    for name, prompts in views.items():
        h_view, _ = scaled_hidden(model, family, replace(batch, prompts=prompts), temperature)
        ent[name] = scatter_tokens(chunked_entropy(h_view, weight, chunk_size=chunk_size, with_grad=True), mask_NT)
        if kl_method == "full":
            kl_M = chunked_full_kl(h_p, h_view, weight, chunk_size=kl_chunk_size or chunk_size)
        else:
            logp_view_M = gather_logprobs(h_view, weight, ids_M, chunk_size=chunk_size)
            kl_M = sampled_token_kl(logp_orig_M, logp_view_M, estimator, detach_p=detach_orig)
        kl[name] = scatter_tokens(kl_M, mask_NT)
    return ViewTerms(scatter_tokens(logp_orig_M, mask_NT), kl, ent)
