"""Per-family pieces of a tiny offline checkpoint: a small config and the real processor.

:mod:`vlreason.models.tiny` trains the tokenizer, writes the checkpoint and caches it;
this module knows, for each family, which config and processor classes to build and
which tokens and chat-template placeholders the family's processor expects. The runtime
adapter (:mod:`vlreason.models.families`) knows none of this.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# InternVL's processor reads these tokenizer attributes (and their ``_id`` forms).
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_TILE = 56  # tile side of the tiny InternVL (real checkpoints: 448)


def _tf(name: str) -> Any:
    return getattr(importlib.import_module("transformers"), name)


@dataclass(frozen=True)
class TinyBuilder:
    """How to build one family's tiny checkpoint."""

    config: Callable[[Any, dict[str, int]], Any]  # (TinySpec, token ids) -> config
    processor: Callable[[Any, Any, str], Any]  # (tokenizer, TinySpec, chat template) -> processor
    vision_tokens: tuple[str, ...] = QWEN_TOKENS
    named_tokens: dict[str, str] = field(default_factory=dict)
    image_placeholder: str = "<|vision_start|><|image_pad|><|vision_end|>"
    video_placeholder: str = "<|vision_start|><|video_pad|><|vision_end|>"
    adjust: Callable[[Any], None] | None = None  # in-place change of the random model after init
    revision: int = 0  # bumped when this family's build changes (part of its cache key when > 0)


# ---- Qwen families -------------------------------------------------------------------
def mrope_sections(rotary_dim: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) summing to rotary_dim / 2."""
    half = rotary_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _vision_grid(patch_size: int) -> dict[str, int]:
    return {"patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2}


def _vision_sizes(spec, patch_size: int) -> dict[str, Any]:
    """Vision-tower sizes in the Qwen2.5-VL / Qwen3-VL naming."""
    return {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_mlp,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.text_hidden,
        **_vision_grid(patch_size),
    }


def _text(spec, ids: dict[str, int], rotary_dim: int | None = None) -> dict[str, Any]:
    head_dim = spec.text_hidden // spec.text_heads
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_mlp,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_sections(rotary_dim or head_dim),
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def _qwen_config(config_class: str, text: dict, vision: dict, ids: dict[str, int]):
    return _tf(config_class)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def qwen2_vl_config(spec, ids):
    vision = {
        "depth": spec.vision_depth,
        "embed_dim": spec.vision_hidden,
        "hidden_size": spec.text_hidden,  # output size of the merger
        "num_heads": spec.vision_heads,
        "mlp_ratio": max(1, spec.vision_mlp // spec.vision_hidden),
        **_vision_grid(14),
    }
    return _qwen_config("Qwen2VLConfig", _text(spec, ids), vision, ids)


def qwen2_5_vl_config(spec, ids):
    vision = {**_vision_sizes(spec, 14), "window_size": 112, "fullatt_block_indexes": [spec.vision_depth - 1]}
    return _qwen_config("Qwen2_5_VLConfig", _text(spec, ids), vision, ids)


def qwen3_vl_config(spec, ids):
    text = _text(spec, ids)
    text["head_dim"] = spec.text_hidden // spec.text_heads
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = {**_vision_sizes(spec, 16), "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    return _qwen_config("Qwen3VLConfig", text, vision, ids)


QWEN35_PARTIAL_ROTARY = 0.5  # real Qwen3.5: 0.25; 0.5 keeps three non-empty M-RoPE sections at head_dim 16


def qwen3_5_config(spec, ids):
    """Qwen3.5: Gated DeltaNet (linear attention) layers before each full-attention layer,
    partial rotary M-RoPE, Qwen3-VL's vision tower without deepstack."""
    head_dim = spec.text_hidden // spec.text_heads
    text = _text(spec, ids, rotary_dim=int(head_dim * QWEN35_PARTIAL_ROTARY))
    text["rope_parameters"].update(mrope_interleaved=True, partial_rotary_factor=QWEN35_PARTIAL_ROTARY)
    text.update(
        head_dim=head_dim,
        layer_types=["linear_attention" if (i + 1) % 2 else "full_attention" for i in range(spec.text_layers)],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=max(1, spec.text_kv_heads),
        linear_num_value_heads=spec.text_heads,
    )
    vision = {**_vision_sizes(spec, 16), "num_position_embeddings": 64}
    return _qwen_config("Qwen3_5Config", text, vision, ids)


def long_memory_delta_net(model) -> None:
    """Slow the Gated DeltaNet decay (per-token factor ~0.99 instead of random init's
    up to e^-16), so a tiny model's linear-attention state still depends on the start of
    the prompt: left padding, image tokens and cache order then show in the tests."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
                module.A_log.fill_(float(torch.log(torch.tensor(0.01))))


def qwen_processor(processor_class: str, video_processor_class: str, patch_size: int):
    def build(tokenizer, spec, chat_template: str):
        grid = {"patch_size": patch_size, "merge_size": 2, "temporal_patch_size": 2}
        image_processor = _tf("Qwen2VLImageProcessor")(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, **grid)
        video_processor = _tf(video_processor_class)(**grid)
        return _tf(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=chat_template)

    return build


# ---- InternVL --------------------------------------------------------------------------
def internvl_config(spec, ids):
    """InternVL: an InternViT tower on 56 px tiles (4 x 4 patches of 14, pixel-shuffled to
    4 tokens per tile), an MLP projector and a Qwen2 language model with plain RoPE."""
    patches = (INTERNVL_TILE // 14) ** 2
    text = _text(spec, ids)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    text["model_type"] = "qwen2"
    vision = {
        "hidden_size": spec.vision_hidden,
        "num_hidden_layers": spec.vision_depth,
        "num_attention_heads": spec.vision_heads,
        "intermediate_size": spec.vision_mlp,
        "image_size": INTERNVL_TILE,
        "patch_size": 14,
    }
    return _tf("InternVLConfig")(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=patches // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def internvl_processor(tokenizer, spec, chat_template: str):
    tile = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    image_processor = _tf("GotOcr2ImageProcessor")(size=tile, crop_to_patches=True, min_patches=1, max_patches=4)
    video_processor = _tf("InternVLVideoProcessor")(size=tile)
    return _tf("InternVLProcessor")(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, image_seq_length=(INTERNVL_TILE // 14) ** 2 // 4,
                                    chat_template=chat_template)


BUILDERS: dict[str, TinyBuilder] = {
    "qwen2_vl": TinyBuilder(qwen2_vl_config, qwen_processor("Qwen2VLProcessor", "Qwen2VLVideoProcessor", 14)),
    "qwen2_5_vl": TinyBuilder(qwen2_5_vl_config,
                              qwen_processor("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14)),
    "qwen3_vl": TinyBuilder(qwen3_vl_config, qwen_processor("Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16)),
    "qwen3_5": TinyBuilder(qwen3_5_config, qwen_processor("Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16),
                           adjust=long_memory_delta_net, revision=1),
    "internvl": TinyBuilder(
        internvl_config, internvl_processor,
        vision_tokens=tuple(INTERNVL_NAMED_TOKENS.values()), named_tokens=INTERNVL_NAMED_TOKENS,
        image_placeholder="<IMG_CONTEXT>\n", video_placeholder="<video>\n",
    ),
}


def get_builder(family: str) -> TinyBuilder:
    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for family '{family}'; have: {', '.join(BUILDERS)}")
    return BUILDERS[family]


def build_processor(family: str, tokenizer, spec, chat_template: str):
    """The family's real processor classes around ``tokenizer`` (tiny image settings)."""
    return get_builder(family).processor(tokenizer, spec, chat_template)
