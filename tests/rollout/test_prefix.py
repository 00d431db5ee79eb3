"""Prefix-shared sampling (rollout/prefix.py) against the plain HF-generate path, on tiny
real Qwen-VL models: same tokens under the same seed (greedy and sampled, rows ending
at different steps), loop logits equal to a full forward, M-RoPE positions continuing
the left-padded prompt, vision tokens never emitted, vision tower run once."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vlreason.models.families import get_family
from vlreason.models.loading import ModelConfig
from vlreason.models.tiny import FAMILIES, family_available, tiny_model_path
from vlreason.rollout.batch import PromptBatch
from vlreason.rollout.generate import VISION_TOKENS, end_token_ids, sample_with_generate
from vlreason.rollout.policy import Policy, RolloutConfig
from vlreason.rollout.prefix import DecodeSettings, prefill, sample_with_shared_prefix

G = 4
MAX_NEW = 12


@pytest.fixture(scope="module")
def policies() -> dict[str, Policy]:
    return {}


def _policy(policies: dict[str, Policy], family: str = "qwen2_5_vl") -> Policy:
    ok, why = family_available(family)
    if not ok:
        pytest.skip(why)
    if family not in policies:
        rollout = RolloutConfig(num_generations=G, max_new_tokens=MAX_NEW, max_pixels=112 * 112)
        policies[family] = Policy.load(ModelConfig(name_or_path=str(tiny_model_path(family=family))), rollout)
    return policies[family]


def _prompts(policy: Policy, rows) -> PromptBatch:
    prompts = policy.prompts(rows)
    assert prompts.images_per_prompt == [1, 2]
    assert (prompts.attention_mask_PT == 0).any(), "the test prompts must involve left padding"
    return prompts


def _sample_both(policy: Policy, prompts: PromptBatch, seed: int, **sampling):
    cfg = replace(policy.rollout, **sampling)
    plain = policy.sample(prompts, seed=seed, sampling=replace(cfg, share_prefix=False))
    shared = policy.sample(prompts, seed=seed, sampling=replace(cfg, share_prefix=True))
    return plain, shared


def _assert_same_completions(plain, shared) -> None:
    assert torch.equal(plain.completion_ids_NT, shared.completion_ids_NT)
    assert torch.equal(plain.completion_mask_NT, shared.completion_mask_NT)
    assert torch.equal(plain.truncated_N, shared.truncated_N)
    assert plain.texts == shared.texts


# Qwen3.5 and InternVL: their prefix path (Qwen3.5's linear-attention cache, InternVL's
# plain positions) is checked against a full forward by test_loop_logits_match_full_forward,
# and that forward against the model's own on raw pixels (test_rollout.py,
# tests/models/test_family_layouts.py); HF generate on them would add ~30 s here.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("qwen3_5", "internvl")])
def test_greedy_matches_plain_generate(policies, rows, family):
    policy = _policy(policies, family)
    plain, shared = _sample_both(policy, _prompts(policy, rows), seed=0, temperature=0.0)
    _assert_same_completions(plain, shared)
    assert shared.completion_ids_NT.shape == (2 * G, MAX_NEW)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 50), (1.3, 0.8, 0)])
def test_sampled_tokens_match_plain_generate_under_seed(policies, rows, temperature, top_p, top_k):
    policy = _policy(policies)
    plain, shared = _sample_both(policy, _prompts(policy, rows), seed=7,
                                 temperature=temperature, top_p=top_p, top_k=top_k)
    _assert_same_completions(plain, shared)
    # G completions of a prompt differ from each other: the rows are sampled independently
    assert not torch.equal(shared.completion_ids_NT[0], shared.completion_ids_NT[1])


def test_text_only_prompt_beside_an_image_prompt_matches_plain_generate(policies, rows):
    policy = _policy(policies)
    text_row = {**rows[1], "id": "t", "images": [], "question": "How many shapes are on the left?"}
    prompts = policy.prompts([text_row, rows[0]])
    assert prompts.images_per_prompt == [0, 1]
    plain, shared = _sample_both(policy, prompts, seed=2, temperature=1.0)
    _assert_same_completions(plain, shared)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_ending_early_match_plain_generate(policies, rows, temperature):
    """Extra end ids taken from a first run make rows stop at different steps."""
    policy = _policy(policies)
    model, family = policy.model, policy.family
    prompts = _prompts(policy, rows)
    encoded = family.encode_images(model, prompts.pixel_values, prompts.image_grid_thw)
    tok = policy.processor.tokenizer
    settings = DecodeSettings(
        num_generations=G, max_new_tokens=MAX_NEW, temperature=temperature, top_p=1.0, top_k=0,
        suppress_ids=[tok.convert_tokens_to_ids(t) for t in VISION_TOKENS],
        end_ids=end_token_ids(policy.processor), pad_id=tok.pad_token_id,
        prompt_seeds=tuple(11 + p for p in range(prompts.num_prompts)),
    )

    def both(settings: DecodeSettings) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for sampler in (sample_with_generate, sample_with_shared_prefix):
            torch.manual_seed(0)  # the samplers draw from the per-prompt seeds, not this stream
            out.append(sampler(model, family, prompts, encoded, settings))
        return out[0], out[1]

    with torch.no_grad():
        first, _ = both(settings)
        settings = replace(settings, end_ids=sorted({*settings.end_ids, int(first[0, 2]), int(first[-1, 5])}))
        plain, shared = both(settings)
    assert torch.equal(plain, shared)
    ended = torch.isin(shared, torch.tensor(settings.end_ids))
    has_end, first_end = ended.any(-1), ended.float().argmax(-1)
    lengths = torch.where(has_end, first_end + 1, shared.shape[1])
    assert len(set(lengths.tolist())) > 1, "want rows ending at different steps"
    after_end = torch.arange(shared.shape[1])[None, :] > torch.where(has_end, first_end, shared.shape[1])[:, None]
    assert torch.all(shared[after_end] == tok.pad_token_id), "finished rows must be fed the pad token"


@pytest.mark.parametrize("family", FAMILIES)
def test_loop_logits_match_full_forward(policies, rows, family):
    """log-softmax of the loop's raw logits at the sampled tokens = a full forward's log-probs."""
    policy = _policy(policies, family)
    prompts = _prompts(policy, rows)
    captured: list[torch.Tensor] = []
    handle = policy.family.lm_head(policy.model).register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        batch = policy.sample(prompts, seed=3, sampling=replace(policy.rollout, temperature=1.0, share_prefix=True))
    finally:
        handle.remove()
    first, *rest = captured
    logits_NTV = torch.stack([first.repeat_interleave(G, dim=0), *rest], dim=1)
    steps = logits_NTV.shape[1]
    ids = batch.completion_ids_NT[:, :steps]
    loop = torch.log_softmax(logits_NTV.float(), -1).gather(-1, ids[..., None])[..., 0]
    scored = policy.token_outputs(batch).logprobs_NT[:, :steps]
    mask = batch.completion_mask_NT[:, :steps].bool()
    torch.testing.assert_close(loop[mask], scored[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).position_rows == 3])
def test_decode_positions_continue_the_unpadded_prompt(policies, rows, family):
    """First new token at rope_delta + real (unpadded) prompt length, all three rows equal
    (M-RoPE families; InternVL's plain positions: tests/models/test_family_layouts.py)."""
    policy = _policy(policies, family)
    prompts = _prompts(policy, rows)
    core = policy.family.core(policy.model)
    _, rope_deltas = core.get_rope_index(prompts.input_ids_PT, prompts.mm_token_type_ids_PT,
                                         prompts.image_grid_thw, attention_mask=prompts.attention_mask_PT)
    with torch.no_grad():
        encoded = policy.family.encode_images(policy.model, prompts.pixel_values, prompts.image_grid_thw)
        start = prefill(policy.model, policy.family, prompts, encoded)
    expected = rope_deltas[:, 0] + prompts.attention_mask_PT.sum(-1)
    assert torch.equal(start.next_position_3P, expected.expand(3, -1))
    assert start.cache.get_seq_length() == prompts.input_ids_PT.shape[1]


def test_sampling_is_seeded_and_never_emits_vision_tokens(policies, rows):
    """Vision-token logits are boosted to the top: suppression must still keep them out."""
    policy = _policy(policies)
    prompts = _prompts(policy, rows)
    vision_ids = torch.tensor([policy.processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS])

    def boost(module, args, out):
        out[..., vision_ids] += 50.0
        return out

    handle = policy.family.lm_head(policy.model).register_forward_hook(boost)
    try:
        a, b, c = (policy.sample(prompts, seed=s, sampling=replace(policy.rollout, share_prefix=True)) for s in (5, 5, 6))
    finally:
        handle.remove()
    assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)
    assert not torch.equal(a.completion_ids_NT, c.completion_ids_NT)
    assert not torch.isin(a.completion_ids_NT, vision_ids).any()


def test_vision_tower_runs_once(policies, rows):
    policy = _policy(policies)
    prompts = _prompts(policy, rows)
    calls, patch_rows = [], []

    def count(module, args, output):
        calls.append(1)
        patch_rows.append(args[0].shape[0])

    handle = policy.model.model.visual.register_forward_hook(count)
    try:
        policy.sample(prompts, seed=0, sampling=replace(policy.rollout, share_prefix=True))
    finally:
        handle.remove()
    assert (len(calls), sum(patch_rows)) == (1, int(prompts.image_grid_thw.prod(-1).sum()))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_sampling_runs_in_eval_mode_and_restores_the_mode_even_on_an_error(policies, rows, monkeypatch,
                                                                           share_prefix):
    """Images are encoded and completions sampled in eval mode; the caller's train mode
    comes back afterwards, also when sampling raises (callers need not switch modes)."""
    import vlreason.rollout.generate as generate

    policy = _policy(policies)
    prompts = _prompts(policy, rows)
    cfg = replace(policy.rollout, share_prefix=share_prefix)
    name = "sample_with_shared_prefix" if share_prefix else "sample_with_generate"
    real, seen = getattr(generate, name), []

    def sampler(model, *args):
        seen.append(model.training)
        return real(model, *args)

    encode = generate.encode_prompt_images
    monkeypatch.setattr(generate, "encode_prompt_images", lambda model, *a: (seen.append(model.training),
                                                                              encode(model, *a))[1])
    monkeypatch.setattr(generate, name, sampler)
    policy.model.train()
    policy.sample(prompts, seed=0, sampling=cfg)
    assert seen == [False, False] and policy.model.training

    def broken(model, *args):
        raise RuntimeError("sampler failed")

    monkeypatch.setattr(generate, name, broken)
    with pytest.raises(RuntimeError, match="sampler failed"):
        policy.sample(prompts, seed=0, sampling=cfg)
    assert policy.model.training
    policy.model.eval()
