"""Training-side forward passes over completions: per-token log-probs, entropy, top-k.

Each pass runs the vision tower once over the distinct images of the prompts present
(never once per completion) and reuses those features for every completion of the
prompt. Log-probs come from the last hidden states through the LM head in chunks, so
no [batch, sequence, vocab] fp32 tensor exists (DESIGN.md, performance rules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlreason.models.families import Family, qwen_pixel_rows
from vlreason.rollout.batch import RolloutBatch
from vlreason.rollout.chunked import chunked_topk, gather_logprobs
from vlreason.rollout.chunked_entropy import chunked_entropy


@dataclass
class TokenOutputs:
    logprobs_NT: torch.Tensor  # log-prob of each completion token (0 on padding)
    entropy_NT: torch.Tensor | None = None
    topk_logprobs_NTK: torch.Tensor | None = None
    topk_ids_NTK: torch.Tensor | None = None
    logprobs_at_NTK: torch.Tensor | None = None  # log-probs at caller-given ids


# Rows of Qwen's patch-flattened ``pixel_values`` per image (the family's layout:
# ``family.pixel_rows(prompts)`` is the general form).
pixel_rows = qwen_pixel_rows


def encode_prompt_images(model, family: Family, batch: RolloutBatch, prompt_index: list[int]):
    """Vision-tower outputs for the images of ``prompt_index`` (one call, each image once)."""
    prompts = batch.prompts
    if prompts.pixel_values is None or not prompt_index:
        return None, []
    image_index = prompts.image_index(prompt_index)
    pixel_values = family.pixel_values_of(prompts, image_index)
    encoded = family.encode_images(model, pixel_values, family.image_meta(prompts, image_index))
    return encoded, image_index


def completion_hidden_states(model, family: Family, batch: RolloutBatch) -> torch.Tensor:
    """Hidden states [N, Tc, H] that predict each completion token."""
    prompts = batch.prompts
    group = batch.group_ids_N.to(prompts.input_ids_PT.device)
    encoded, encoded_images = encode_prompt_images(model, family, batch, sorted(set(group.tolist())))
    input_ids = torch.cat([prompts.input_ids_PT[group], batch.completion_ids_NT], dim=1)
    completion_mask = batch.completion_mask_NT.to(prompts.attention_mask_PT.dtype)
    attention_mask = torch.cat([prompts.attention_mask_PT[group], completion_mask], dim=1)
    mm_types = None
    grid = None
    if prompts.mm_token_type_ids_PT is not None:
        zeros = torch.zeros_like(batch.completion_ids_NT, dtype=prompts.mm_token_type_ids_PT.dtype)
        mm_types = torch.cat([prompts.mm_token_type_ids_PT[group], zeros], dim=1)
    if encoded is not None:
        # every completion reuses its prompt's images from the one encoding above
        needed = prompts.image_index(group.tolist())
        position = {image: k for k, image in enumerate(encoded_images)}
        encoded = family.select_images(encoded, [position[i] for i in needed])
        grid = family.image_meta(prompts, needed)
    hidden = family.hidden_states(model, input_ids, attention_mask, mm_types, grid, encoded)
    prompt_len = prompts.input_ids_PT.shape[1]
    completion_len = batch.completion_ids_NT.shape[1]
    return hidden[:, prompt_len - 1 : prompt_len - 1 + completion_len]


def token_outputs(
    model,
    family: Family,
    batch: RolloutBatch,
    *,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    topk: int = 0,
    at_ids_NTK: torch.Tensor | None = None,
    at_topk: bool = False,
    temperature: float = 1.0,
) -> TokenOutputs:
    """Per-token log-probs of the completion tokens (and optional extras) in one forward.

    Only positions under ``completion_mask_NT`` are scored; padding gets 0. ``at_topk``
    (with ``topk``, without ``at_ids_NTK``): ``logprobs_at_NTK`` holds the log-probs at
    this forward's own top-k ids, with gradient (Vision-OPD: one student pass gives the
    ids and the differentiable log-probs at them). With
    ``temperature`` != 1 the distribution is softmax(logits / temperature), the one the
    completions were sampled from (the LM head has no bias, so the hidden states are
    scaled instead of the logits).
    """
    hidden = completion_hidden_states(model, family, batch)
    mask = batch.completion_mask_NT.bool().to(hidden.device)
    h_MH = hidden[mask]
    if temperature != 1.0:
        h_MH = h_MH / temperature
    weight = family.lm_head(model).weight
    ids_M = batch.completion_ids_NT.to(hidden.device)[mask]
    shape = batch.completion_ids_NT.shape

    def scatter(values_M: torch.Tensor, *trailing: int) -> torch.Tensor:
        out = values_M.new_zeros((*shape, *trailing))
        out[mask] = values_M
        return out

    logprobs = scatter(gather_logprobs(h_MH, weight, ids_M, chunk_size=chunk_size))
    result = TokenOutputs(logprobs_NT=logprobs)
    if with_entropy:
        result.entropy_NT = scatter(chunked_entropy(h_MH, weight, chunk_size=chunk_size, with_grad=entropy_grad))
    if topk > 0:
        values, ids = chunked_topk(h_MH, weight, topk, chunk_size=chunk_size)
        result.topk_logprobs_NTK = scatter(values, topk)
        result.topk_ids_NTK = scatter(ids, topk)
        if at_topk and at_ids_NTK is None:
            at_ids_NTK = result.topk_ids_NTK
    if at_ids_NTK is not None:
        at_ids = at_ids_NTK.to(hidden.device)[mask]
        result.logprobs_at_NTK = scatter(
            gather_logprobs(h_MH, weight, at_ids, chunk_size=chunk_size), at_ids.shape[-1]
        )
    return result
