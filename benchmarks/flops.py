"""Model FLOPs of one GRPO update pass, counted for what the pass actually computes.

Used by ``gpu_bench.py`` for the update's MFU. Conventions (the usual "model FLOPs":
a multiply-add is 2 FLOPs; training = forward + backward = 3 x forward for trained
weights; gradient-checkpointing recompute is not counted, so MFU is not inflated by it):

- **Text layers**: ``2 * layer_params`` per text token of every sequence the update
  scores (its prompt, image tokens included, and its completion; each completion row
  carries its own prompt in the update). Embedding lookups cost nothing.
- **Text attention** (causal, per layer): a sequence of length ``L`` costs
  ``2 * d_attn * L * (L + 1)`` (``QK^T`` and ``AV`` over the ``L(L+1)/2`` pairs that
  are not masked), ``d_attn = heads * head_dim``.
- **Output layer**: ``2 * hidden * vocab`` per completion token only; vlreason never
  computes logits for prompt positions (``token_outputs`` slices the hidden states
  first).
- **Vision tower**: ``2 * per_patch_params`` per patch row it encodes in the pass (patch
  embedding and blocks), ``2 * merger_params`` per merged token (``patches / merge**2``),
  and per block ``4 * hidden * S * S_ctx`` attention (non-causal), ``S_ctx`` being the
  image's patch count in full-attention blocks and ``min(S, window_patches)`` in
  windowed ones. Trained: x3; frozen: x1 (no backward through pixels).

Pure functions of plain numbers; :func:`shapes_from_model` reads the numbers off a
Qwen2/2.5-VL-layout model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TextShape:
    layer_params: int  # parameters of all decoder layers (norms included), no embedding
    layers: int
    attn_dim: int  # num_attention_heads * head_dim
    hidden: int
    vocab: int


@dataclass(frozen=True)
class VisionShape:
    per_patch_params: int  # patch embedding + all blocks
    merger_params: int
    hidden: int
    depth: int
    full_attention_blocks: int
    window_patches: int  # patches per attention window (0: every block attends fully)
    merge: int  # spatial merge size (2 for Qwen2/2.5-VL)
    trained: bool = True


def text_flops(text: TextShape, prompt_lens: Sequence[int], completion_lens: Sequence[int]) -> dict[str, float]:
    """Forward FLOPs of the language model over sequences ``prompt + completion``."""
    if len(prompt_lens) != len(completion_lens):
        raise ValueError(f"{len(prompt_lens)} prompt lengths for {len(completion_lens)} completions")
    tokens = sum(prompt_lens) + sum(completion_lens)
    pairs = sum((p + c) * (p + c + 1) for p, c in zip(prompt_lens, completion_lens))
    return {
        "text_layers": 2.0 * text.layer_params * tokens,
        "text_attention": 2.0 * text.attn_dim * pairs * text.layers,
        "output_layer": 2.0 * text.hidden * text.vocab * sum(completion_lens),
    }


def vision_flops(vision: VisionShape, patches_per_image: Sequence[int]) -> dict[str, float]:
    """Forward FLOPs of the vision tower over images of ``patches_per_image`` patch rows."""
    patches = sum(patches_per_image)
    merged = patches / (vision.merge * vision.merge)
    windowed = vision.depth - vision.full_attention_blocks
    attention = 0.0
    for s in patches_per_image:
        window = min(s, vision.window_patches) if vision.window_patches else s
        attention += 4.0 * vision.hidden * s * (vision.full_attention_blocks * s + windowed * window)
    return {
        "vision_layers": 2.0 * (vision.per_patch_params * patches + vision.merger_params * merged),
        "vision_attention": attention,
    }


def update_flops(
    text: TextShape,
    vision: VisionShape | None,
    prompt_lens: Sequence[int],
    completion_lens: Sequence[int],
    patches_per_image: Sequence[int] = (),
) -> dict[str, float]:
    """Training FLOPs of one update pass by part, and their ``total``."""
    parts = {k: 3.0 * v for k, v in text_flops(text, prompt_lens, completion_lens).items()}
    if vision is not None and patches_per_image:
        factor = 3.0 if vision.trained else 1.0
        parts.update({k: factor * v for k, v in vision_flops(vision, patches_per_image).items()})
    parts["total"] = sum(parts.values())
    return parts


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes_from_model(model: Any) -> tuple[TextShape, VisionShape | None]:
    """Text and vision shapes of a Qwen2/2.5-VL-layout model (``model.model.language_model``,
    ``model.model.visual`` with ``patch_embed``, ``blocks``, ``merger``)."""
    config = model.config
    text_config = getattr(config, "text_config", config)
    inner = model.model
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    text = TextShape(
        layer_params=_count(inner.language_model.layers),
        layers=text_config.num_hidden_layers,
        attn_dim=heads * head_dim,
        hidden=text_config.hidden_size,
        vocab=text_config.vocab_size,
    )
    visual = getattr(inner, "visual", None)
    if visual is None:
        return text, None
    vc = config.vision_config
    full = list(getattr(vc, "fullatt_block_indexes", None) or [])
    window_px = getattr(vc, "window_size", 0) or 0
    window = (window_px // vc.patch_size) ** 2 if full and window_px else 0
    vision = VisionShape(
        per_patch_params=_count(visual.patch_embed) + _count(visual.blocks),
        merger_params=_count(visual.merger),
        # Qwen2-VL calls the tower width embed_dim (its hidden_size is the output width)
        hidden=getattr(vc, "embed_dim", None) or vc.hidden_size,
        depth=vc.depth,
        full_attention_blocks=len(full) if window else vc.depth,
        window_patches=window,
        merge=vc.spatial_merge_size,
        trained=any(p.requires_grad for p in visual.parameters()),
    )
    return text, vision
