"""Prefix-shared sampling: prefill each prompt once, decode its G completions from copies.

The G completions of a prompt share the whole prompt, image tokens included, so the
prompt's KV cache is computed once (batch P, not P x G) and then repeated G times along
the batch, prompt-major like the plain path (rows p*G ... p*G+G-1). A plain decode loop
follows, one token per step for all N = P x G rows.

Positions belong to the family (:mod:`vlreason.models.families`): ``prompt_positions``
gives ``[R, P, T]`` (R = 3 M-RoPE rows from the model's own ``get_rope_index`` for the
Qwen families, R = 1 plain row for InternVL; left padding excluded through the attention
mask). Every generated token is text, so its R rows are equal and continue from the
prompt's last position: ``position = last_prompt_position + 1 + step`` (for M-RoPE
``rope_delta + real prompt length + step``, the real length, not the padded one). This
is the rule HF ``generate`` applies (``position_ids[..., -1] + 1`` per step). The
family also turns ``[R, B, T]`` into the model's ``position_ids`` (``model_positions``)
and repeats the prompt cache (``repeat_cache``: Qwen3.5's linear-attention states too).

Sampling mirrors HF ``generate``: the same logits processors in the same order (vision
tokens suppressed, then temperature, top-k, top-p), one ``torch.multinomial`` per step
(argmax when greedy), finished rows fed the pad token, stop when every row has produced
an end token or ``max_new_tokens`` is reached. The noise is seeded per prompt: prompt p
draws its G rows from its own ``torch.Generator`` seeded with ``prompt_seeds[p]``, so
its samples do not depend on which other prompts share the batch (or the process).
The plain path runs ``generate`` prompt by prompt under the same seeds and therefore
draws the same tokens (tests/rollout/test_prefix.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    Cache,
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlreason.models.families import Family
from vlreason.rollout.batch import PromptBatch


@dataclass
class Prefill:
    """The prompts run once: what the decode loop starts from."""

    logits_PV: torch.Tensor  # next-token logits after each prompt
    cache: Cache  # the P prompts' keys / values
    next_position_RP: torch.Tensor  # position rows (M-RoPE t, h, w; or one plain row) of each first new token

    @property
    def next_position_3P(self) -> torch.Tensor:
        """The M-RoPE name of ``next_position_RP`` (R = 3 for the Qwen families)."""
        return self.next_position_RP


@dataclass(frozen=True)
class DecodeSettings:
    """What the decode loop needs besides the model and the prompts."""

    num_generations: int
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    suppress_ids: list[int]
    end_ids: list[int]
    pad_id: int
    prompt_seeds: tuple[int, ...] = ()  # one sampling seed per prompt (needed when sampling)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def prompt_positions(model, family: Family, prompts: PromptBatch) -> torch.Tensor:
    """Positions [R, P, T] of the left-padded prompts (padding positions are 0), as the family lays them out."""
    return family.prompt_positions(model, prompts)


def prefill(model, family: Family, prompts: PromptBatch, encoded=None) -> Prefill:
    """One forward over the P prompts (images pre-encoded, in prompt order) with a cache."""
    positions = prompt_positions(model, family, prompts)
    kwargs = {}
    if encoded is not None:
        all_images = list(range(sum(prompts.images_per_prompt)))
        kwargs = family.image_inputs(encoded, family.image_meta(prompts, all_images))
    out = family.core(model)(
        input_ids=prompts.input_ids_PT,
        attention_mask=prompts.attention_mask_PT,
        position_ids=family.model_positions(positions),
        mm_token_type_ids=prompts.mm_token_type_ids_PT,
        use_cache=True,
        **kwargs,
    )
    logits = family.lm_head(model)(out.last_hidden_state[:, -1])
    return Prefill(logits_PV=logits, cache=out.cache, next_position_RP=positions[:, :, -1] + 1)


def decode_step(
    model, family: Family, tokens_N: torch.Tensor, attention_mask_NT: torch.Tensor,
    position_RN: torch.Tensor, cache: Cache,
) -> torch.Tensor:
    """Feed one token per row at its position (R rows); next-token logits [N, V]."""
    out = family.core(model)(
        input_ids=tokens_N[:, None],
        attention_mask=attention_mask_NT,
        position_ids=family.model_positions(position_RN[:, :, None]),
        cache=cache,
        use_cache=True,
    )
    return family.lm_head(model)(out.last_hidden_state[:, -1])


def logits_processors(settings: DecodeSettings, device: torch.device) -> LogitsProcessorList:
    """HF's own processors, in the order ``generate`` applies them for these settings."""
    processors = LogitsProcessorList()
    if settings.suppress_ids:
        processors.append(SuppressTokensLogitsProcessor(settings.suppress_ids, device=device))
    if settings.sampling:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=settings.top_p))
    return processors


def prompt_generators(settings: DecodeSettings, num_prompts: int, device: torch.device) -> list[torch.Generator]:
    """One generator per prompt, seeded with its ``prompt_seeds`` entry (none when greedy)."""
    if not settings.sampling:
        return []
    if len(settings.prompt_seeds) != num_prompts:
        raise ValueError(f"sampling needs one seed per prompt: {num_prompts} prompts, "
                         f"{len(settings.prompt_seeds)} seeds")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in settings.prompt_seeds]


def next_tokens(scores_NV: torch.Tensor, generators: list[torch.Generator], group_size: int) -> torch.Tensor:
    """One draw per row from the processed scores, rows p*G ... p*G+G-1 from prompt p's
    generator (``torch.multinomial`` as ``generate`` draws); argmax without generators."""
    if not generators:
        return scores_NV.argmax(-1)
    probs = torch.softmax(scores_NV, dim=-1)
    draws = [torch.multinomial(probs[p * group_size : (p + 1) * group_size], num_samples=1, generator=g)
             for p, g in enumerate(generators)]
    return torch.cat(draws).squeeze(1)


@torch.no_grad()
def sample_with_shared_prefix(
    model, family: Family, prompts: PromptBatch, encoded, settings: DecodeSettings
) -> torch.Tensor:
    """Generated ids [P*G, steps], prompt-major, finished rows padded with ``pad_id``.

    ``encoded`` holds the vision-tower outputs of the prompts' images in prompt order
    (or None for text-only prompts); the tower is not run here.
    """
    G = settings.num_generations
    start = prefill(model, family, prompts, encoded)
    family.repeat_cache(start.cache, G)
    logits = start.logits_PV.repeat_interleave(G, dim=0)
    position = start.next_position_RP.repeat_interleave(G, dim=1)
    attention_mask = prompts.attention_mask_PT.repeat_interleave(G, dim=0)
    processors = logits_processors(settings, logits.device)
    generators = prompt_generators(settings, prompts.num_prompts, logits.device)
    end_ids = torch.tensor(settings.end_ids, device=logits.device)
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    generated = logits.new_empty(logits.shape[0], 0, dtype=torch.long)
    for step in range(settings.max_new_tokens):
        # these processors never read the ids they are given (HF passes prompt + generated)
        scores = processors(generated, logits.float())
        tokens = next_tokens(scores, generators, G).masked_fill(~unfinished, settings.pad_id)
        generated = torch.cat([generated, tokens[:, None]], dim=1)
        unfinished &= ~torch.isin(tokens, end_ids)
        if not unfinished.any() or step + 1 == settings.max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        logits = decode_step(model, family, tokens, attention_mask, position + step, start.cache)
    return generated
