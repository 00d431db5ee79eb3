"""benchmarks/decode_loops.py's static-cache loop draws the prefix loop's tokens (eager; the
compiled step is the same function under torch.compile, measured, not tested here: compiling
takes minutes on these CPUs). Tiny Qwen2.5-VL, left-padded prompts, rows ending early."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from decode_loops import StaticDecoder, sample_static  # noqa: E402

from vlreason.models.loading import ModelConfig  # noqa: E402
from vlreason.models.tiny import tiny_model_path  # noqa: E402
from vlreason.rollout.policy import Policy, RolloutConfig  # noqa: E402
from vlreason.rollout.prefix import DecodeSettings, sample_with_shared_prefix  # noqa: E402

G, MAX_NEW = 4, 10


@pytest.fixture(scope="module")
def policy() -> Policy:
    rollout = RolloutConfig(num_generations=G, max_new_tokens=MAX_NEW, max_pixels=112 * 112)
    return Policy.load(ModelConfig(name_or_path=str(tiny_model_path())), rollout)


def test_static_cache_loop_draws_the_prefix_loops_tokens(policy, rows):
    model, family = policy.model, policy.family
    prompts = policy.prompts(rows)
    assert (prompts.attention_mask_PT == 0).any(), "the prompts must involve left padding"
    encoded = family.encode_images(model, prompts.pixel_values, prompts.image_grid_thw)
    tok = policy.processor.tokenizer
    settings = DecodeSettings(num_generations=G, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0,
                              top_k=0, suppress_ids=family.suppress_ids(tok), end_ids=family.end_ids(tok),
                              pad_id=tok.pad_token_id, prompt_seeds=(3, 4))
    decoder = StaticDecoder(model, family)
    model.eval()
    with torch.no_grad():
        first = sample_with_shared_prefix(model, family, prompts, encoded, settings)
        # extra end ids from a first draw: rows stop at different steps
        settings = replace(settings, end_ids=sorted({*settings.end_ids, int(first[0, 2]), int(first[-1, 5])}))
        prefix = sample_with_shared_prefix(model, family, prompts, encoded, settings)
        static = sample_static(model, family, prompts, encoded, settings, decoder)
    assert torch.equal(prefix, static)
    assert (prefix == tok.pad_token_id).any(), "some rows must end early"
