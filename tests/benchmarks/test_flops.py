"""benchmarks/flops.py: update FLOPs counted for what the pass computes (hand-worked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from flops import TextShape, VisionShape, shapes_from_model, text_flops, update_flops, vision_flops  # noqa: E402

TEXT = TextShape(layer_params=10, layers=2, attn_dim=4, hidden=3, vocab=5)
VISION = VisionShape(per_patch_params=7, merger_params=3, hidden=2, depth=3,
                     full_attention_blocks=1, window_patches=4, merge=2)


def test_text_flops_by_hand():
    parts = text_flops(TEXT, prompt_lens=[2], completion_lens=[1])
    assert parts["text_layers"] == 2 * 10 * 3
    # causal: a length-3 sequence has 6 unmasked (query, key) pairs; QK^T and AV cost
    # 2 * attn_dim each per pair, in each of the 2 layers
    pairs = sum(1 for i in range(3) for j in range(3) if j <= i)
    assert parts["text_attention"] == 2 * (2 * 4) * pairs * 2
    assert parts["output_layer"] == 2 * 3 * 5 * 1  # completion positions only


def test_prompt_tokens_cost_layers_and_attention_but_no_output_layer():
    short = text_flops(TEXT, [1], [4])
    long = text_flops(TEXT, [9], [4])
    assert long["output_layer"] == short["output_layer"]
    assert long["text_layers"] > short["text_layers"]
    assert long["text_attention"] > short["text_attention"]
    with pytest.raises(ValueError, match="2 prompt lengths for 1 completions"):
        text_flops(TEXT, [1, 2], [3])


def test_vision_flops_by_hand():
    parts = vision_flops(VISION, patches_per_image=[16, 2])
    assert parts["vision_layers"] == 2 * (7 * 18 + 3 * 18 / 4)
    # image of 16 patches: 1 full block (16 keys each) + 2 windowed blocks (4 keys each);
    # image of 2 patches: its window is the whole image
    assert parts["vision_attention"] == 4 * 2 * 16 * (16 + 2 * 4) + 4 * 2 * 2 * (2 + 2 * 2)


def test_training_triples_trained_parts_and_frozen_vision_counts_forward_only():
    trained = update_flops(TEXT, VISION, [2], [1], [16])
    frozen = update_flops(TEXT, VisionShape(**{**VISION.__dict__, "trained": False}), [2], [1], [16])
    forward = vision_flops(VISION, [16])
    assert trained["vision_layers"] == 3 * forward["vision_layers"]
    assert frozen["vision_layers"] == forward["vision_layers"]
    assert trained["text_layers"] == 3 * text_flops(TEXT, [2], [1])["text_layers"]
    assert trained["total"] == pytest.approx(sum(v for k, v in trained.items() if k != "total"))
    assert "vision_layers" not in update_flops(TEXT, None, [2], [1])


def test_shapes_from_the_tiny_model_partition_its_parameters():
    from transformers import AutoModelForImageTextToText

    root = Path(__file__).resolve().parents[2]
    model = AutoModelForImageTextToText.from_pretrained(root / "assets" / "warm-tiny")
    text, vision = shapes_from_model(model)
    inner = model.model
    rest = sum(p.numel() for p in inner.language_model.embed_tokens.parameters()) + sum(
        p.numel() for p in inner.language_model.norm.parameters()
    )
    if not model.config.get_text_config().tie_word_embeddings:
        rest += sum(p.numel() for p in model.lm_head.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert text.layer_params + vision.per_patch_params + vision.merger_params + rest == total
    cfg = model.config.vision_config
    assert vision.window_patches == (cfg.window_size // cfg.patch_size) ** 2
    assert vision.full_attention_blocks == len(cfg.fullatt_block_indexes)
    assert text.vocab == model.config.get_text_config().vocab_size
