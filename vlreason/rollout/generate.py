"""Sample G completions per prompt.

The vision tower runs once over the prompts' images; its outputs are handed to
``generate`` as pre-computed encoder outputs, expanded to the G copies by index (no
re-encoding). Sampling is seeded per prompt (``seed``: one seed per prompt, or one int
from which they are derived), independent of the global RNG stream and of the other
prompts in the batch: a resumed run samples exactly what an uninterrupted one would,
and a prompt gets the same completions on 1 or N processes.

Two samplers draw the same tokens under the same seed: with ``share_prefix`` (default)
each prompt is prefilled once and its KV cache reused by its G completions
(``rollout/prefix.py``); without it, HF ``generate`` runs on the G copies of each prompt
(the reference path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlreason.config import doc
from vlreason.models.families import QWEN_VISION_TOKENS, Family, get_family
from vlreason.rollout.batch import PromptBatch, RolloutBatch
from vlreason.rollout.forward import encode_prompt_images
from vlreason.rollout.prefix import DecodeSettings, sample_with_shared_prefix

# The Qwen families' vision tokens; each family names its own (``family.suppress_ids``):
# a completion must never contain them, they would corrupt the image-token layout when it
# is scored ("Image features and image tokens do not match").
VISION_TOKENS = QWEN_VISION_TOKENS


@dataclass
class SamplingConfig:
    num_generations: int = doc("Completions sampled per prompt (G).", 4)
    max_new_tokens: int = doc("Maximum completion length in tokens.", 32)
    temperature: float = doc("Sampling temperature (0 = greedy).", 1.0)
    top_p: float = doc("Nucleus sampling threshold.", 1.0)
    top_k: int = doc("Top-k sampling (0 = off).", 0)
    share_prefix: bool = doc(
        "Prefill each prompt once and decode its G completions from copies of its KV cache "
        "(same tokens as plain generate under the same seed, faster); false runs HF generate on G prompt copies.",
        True,
    )

    def validate(self) -> None:
        if self.num_generations < 1:
            raise ValueError("rollout.num_generations must be at least 1")
        if self.max_new_tokens < 1:
            raise ValueError("rollout.max_new_tokens must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ValueError("rollout.top_p must be in (0, 1]")


def end_token_ids(processor, family: Family | None = None) -> list[int]:
    """The family's end-of-turn token and the tokenizer's EOS (Qwen's ``<|im_end|>`` when no family is given)."""
    return (family or get_family("qwen2_5_vl")).end_ids(processor.tokenizer)


def completion_masks(ids_NT: torch.Tensor, end_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each sequence after its first end token: (ids padded after it, mask, truncated)."""
    is_end = torch.isin(ids_NT, torch.tensor(end_ids, device=ids_NT.device))
    has_end = is_end.any(-1)
    first_end = torch.where(has_end, is_end.float().argmax(-1), torch.full_like(has_end, ids_NT.shape[1], dtype=torch.long))
    positions = torch.arange(ids_NT.shape[1], device=ids_NT.device)
    mask = (positions[None, :] <= first_end[:, None]).long()
    ids = torch.where(mask.bool(), ids_NT, torch.full_like(ids_NT, pad_id))
    return ids, mask, ~has_end


def prompt_seeds(seed: int | list[int], num_prompts: int) -> tuple[int, ...]:
    """One sampling seed per prompt: ``seed`` itself when it is a list, else derived from
    (seed, position in the batch)."""
    if isinstance(seed, int):
        return tuple((seed * 1_000_003 + p * 104_729 + 17) % (2**31 - 1) for p in range(num_prompts))
    if len(seed) != num_prompts:
        raise ValueError(f"{len(seed)} seeds for {num_prompts} prompts")
    return tuple(int(s) for s in seed)


def sample_with_generate(model, family: Family, prompts: PromptBatch, encoded, settings: DecodeSettings) -> torch.Tensor:
    """Reference sampler: HF ``generate`` on the G copies of each prompt, one prompt at a
    time under its own seed (the global RNG is reseeded); generated ids only, padded."""
    outs = []
    for p in range(prompts.num_prompts):
        if settings.sampling:
            torch.manual_seed(settings.prompt_seeds[p])
        outs.append(_generate_group(model, family, prompts, encoded, settings, p))
    width = max(o.shape[1] for o in outs)
    return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=settings.pad_id) for o in outs])


def _generate_group(model, family: Family, prompts: PromptBatch, encoded, settings: DecodeSettings, p: int):
    group = torch.full((settings.num_generations,), p, device=prompts.input_ids_PT.device)
    kwargs = {}
    image_index = prompts.image_index(group.tolist()) if encoded is not None else []
    if image_index:  # a text-only prompt has no image to hand over
        kwargs = family.image_inputs(family.select_images(encoded, image_index), family.image_meta(prompts, image_index))
    if prompts.mm_token_type_ids_PT is not None:
        kwargs["mm_token_type_ids"] = prompts.mm_token_type_ids_PT[group]
    sampling = settings.sampling
    out = model.generate(
        input_ids=prompts.input_ids_PT[group],
        attention_mask=prompts.attention_mask_PT[group],
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=settings.top_k if sampling else None,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=settings.end_ids,
        pad_token_id=settings.pad_id,
        suppress_tokens=settings.suppress_ids,
        num_return_sequences=1,
        **kwargs,
    )
    return out[:, prompts.input_ids_PT.shape[1] :]


@torch.no_grad()
def generate_completions(
    model,
    family: Family,
    processor,
    prompts: PromptBatch,
    cfg: SamplingConfig,
    *,
    seed: int | list[int],
    num_generations: int | None = None,
    max_new_tokens: int | None = None,
) -> RolloutBatch:
    """G completions per prompt, grouped prompt-major (rows p*G ... p*G+G-1)."""
    G = num_generations or cfg.num_generations
    max_new = max_new_tokens or cfg.max_new_tokens
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    P = prompts.num_prompts
    group = torch.arange(P, device=device).repeat_interleave(G)
    batch_stub = RolloutBatch(
        prompts=prompts,
        group_ids_N=group,
        completion_ids_NT=torch.empty(P * G, 0, dtype=torch.long),
        completion_mask_NT=torch.empty(P * G, 0, dtype=torch.long),
        truncated_N=torch.zeros(P * G, dtype=torch.bool),
    )
    tok = processor.tokenizer
    settings = DecodeSettings(
        num_generations=G,
        max_new_tokens=max_new,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        suppress_ids=family.suppress_ids(tok),
        end_ids=family.end_ids(tok),
        pad_id=tok.pad_token_id,
        prompt_seeds=prompt_seeds(seed, P),
    )
    sampler = sample_with_shared_prefix if cfg.share_prefix else sample_with_generate
    was_training = model.training
    model.eval()  # images encoded and completions sampled in eval mode, restored even on an error
    try:
        encoded, _ = encode_prompt_images(model, family, batch_stub, list(range(P)))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # generate reseeds
            raw = sampler(model, family, prompts, encoded, settings)
    finally:
        model.train(was_training)
    ids, mask, truncated = completion_masks(raw, settings.end_ids, settings.pad_id)
    texts = tok.batch_decode([row[m.bool()] for row, m in zip(ids, mask)], skip_special_tokens=True)
    return RolloutBatch(
        prompts=prompts,
        group_ids_N=group,
        completion_ids_NT=ids,
        completion_mask_NT=mask,
        truncated_N=truncated,
        texts=texts,
    )
